"""serve.Row, the text of one answer as it streams: stop strings across token boundaries, half
UTF-8 characters never sent, and the sent deltas adding up to the answer."""

import pytest

from picochat.serve import Row


def stream(tokenizer, text, stops):
    """Feed the tokens of text one by one (each token a separate step, so multi-byte characters
    and stop strings span steps); (deltas, row)."""
    row = Row(tokenizer, stops)
    deltas = []
    for token in tokenizer.encode(text):
        deltas.append(row.add(token, set()))
        if row.finish:
            break
    if row.finish is None:
        deltas.append(row.flush())
    return deltas, row


@pytest.mark.parametrize("text, stops, expected", [
    ("Hello world, and more", ["lo wo"], "Hel"),
    ("Hello world, and more", ["zzz", "d, a"], "Hello worl"),
    ("Café 🙂 naïve 中文 end", ["🙂 n"], "Café "),
    ("Café 🙂 naïve 中文 end", ["文 e"], "Café 🙂 naïve 中"),
    ("Café 🙂 naïve 中文 end", [], "Café 🙂 naïve 中文 end"),
    ("no stop here", ["here!"], "no stop here"),
])
def test_stops_and_utf8(small_tokenizer, text, stops, expected):
    deltas, row = stream(small_tokenizer, text, stops)
    assert "".join(deltas) == row.text == expected
    assert not any("\ufffd" in d for d in deltas)
    assert row.finish == ("stop" if expected != text else None)
    # multi-byte characters arrive over several byte-level tokens here, so some steps send nothing
    if "🙂" in text:
        assert "" in deltas
