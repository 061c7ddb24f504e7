"""A tree reduction: leaf units sum chunks, inner units add their children's partial sums.

Each inner unit names the units it depends on (``Unit(arg, after=[...])``); their results stay
on the workers that computed them and are fetched worker to worker through the nodes, never
through the master. ``reduce`` receives only the root's result (the one unit nobody depends on).

    python -m actors.master --workers 2 --run examples/tree_reduce.py
"""

from actors import Client, ParallelTask, Unit


class TreeSum(ParallelTask):
    """The sum of i*i for i < n, as a tree of partial sums ``fan_in`` wide."""

    def get_work(self, n, chunk=1_000, fan_in=4):
        level = [Unit(("leaf", start, min(start + chunk, n))) for start in range(0, n, chunk)]
        yield from level
        while len(level) > 1:
            level = [Unit(("add",), after=level[i:i + fan_in]) for i in range(0, len(level), fan_in)]
            yield from level

    def work_unit(self, unit, *partial_sums):  # partial_sums: the results of `after`, in order
        if unit[0] == "leaf":
            _, start, stop = unit
            return sum(i * i for i in range(start, stop))
        return sum(partial_sums)

    def reduce(self, results):
        (root,) = results
        return root


if __name__ == "__main__":
    with Client() as client:
        n = 1_000_000
        future = client.submit(TreeSum, n=n, chunk=10_000)
        total = future.result(timeout=120)
        assert total == sum(i * i for i in range(n)), total
        print(f"TreeSum({n:_}) = {total}")
        fetched = [e for e in future.story() if e[2] == "flight"]
        print(f"{len(fetched)} partial sums moved worker to worker; the story has "
              f"{len(future.story())} transitions across workers")
