"""The quickstart: a Task, a ParallelTask and a batched map on the cluster named by
$ACTORS_ADDRESS, or on a LocalCluster of its own when run on its own.

    python -m actors.master --workers 2 --port 0 --run examples/quickstart.py
"""

from actors import Client, ParallelTask, Task


class Square(Task):
    def work(self, x):
        return x * x


class SumOfSquares(ParallelTask):
    def get_work(self, n):  # the slicer: yields one argument per work unit, lazily
        yield from range(n)

    def work_unit(self, i):  # runs on any worker of this task
        return i * i

    def reduce(self, results):  # results in unit order
        return sum(results)


if __name__ == "__main__":
    with Client() as client:
        print("Square(7) =", client.submit(Square, x=7).result(timeout=30))
        fut = client.submit(SumOfSquares, n=10_000)
        total = fut.result(timeout=60)
        assert total == sum(i * i for i in range(10_000))
        print("SumOfSquares(10_000) =", total, "progress:", fut.progress())
        # Many small tasks as the units of one task, a future each (client.map_batch)
        squares = client.map_batch(Square, range(10_000))
        print("map_batch(Square, range(10_000)) sums to", sum(client.gather(squares)))
