"""Run a deployed task package by name (see examples/tasks/wordcount):

    python -m actors.master --workers 2 --port 0 --tasks-dir examples/tasks --run examples/deployed.py
"""

from actors import Client

TEXTS = [
    "the actor model keeps state in one mailbox",
    "one mailbox per actor and no locks on the state",
    "the master schedules and the nodes own the workers",
]

if __name__ == "__main__":
    with Client() as client:
        for package in client.packages():
            print(f"{package.package} {package.version}:", [t.name for t in package.tasks])
        counts = client.submit("wordcount.tasks:WordCount", texts=TEXTS, top=3).result(timeout=60)
        print("most common words:", counts)
