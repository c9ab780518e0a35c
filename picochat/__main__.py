from picochat.cli import main

main()
