"""Tiny text helpers, bundled with the wordcount package to show how lib/ works."""

import re

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


def words(text):
    """The words of ``text``, lower-cased: letters and inner apostrophes ("don't")."""
    return [match.group().lower() for match in _WORD.finditer(text)]
