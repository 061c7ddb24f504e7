"""Count words over many texts: one work unit per text, the counts reduced into one tally."""

from collections import Counter

# textstats is bundled in lib/: the worker puts the package's lib/ folder on
# sys.path, so a bundled library is imported by its own name, as if installed.
from textstats import words

from actors import ParallelTask


class WordCount(ParallelTask):
    """The ``top`` most common words across ``texts``, as (word, count) pairs."""

    def get_work(self, texts, top=10):
        self.top = top  # the worker that slices the task also reduces it
        yield from texts

    def work_unit(self, text):
        return Counter(words(text))

    def reduce(self, results):
        total = Counter()
        for counts in results:
            total.update(counts)
        return total.most_common(self.top)
