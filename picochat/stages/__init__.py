"""One module per `picochat <stage>`: main(argv) parses flags into a config dataclass and calls
run(config). A stage imports library modules (picochat/*.py), never another stage."""
