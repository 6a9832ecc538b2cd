"""Summarise a py-spy raw profile (`py-spy record -f raw --threads`): samples per thread, and
the functions with the most samples, self and inclusive, per thread.

    python bench/profile_summary.py PROFILE.txt [--top 25] [--thread MainThread] [--within Engine.step]

--within keeps only the samples whose stack holds a frame containing that text (the timed part
of a script whose imports and loading would fill the profile otherwise).
"""

from __future__ import annotations

import argparse
import collections


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--thread", action="append", default=None, help="only threads whose name contains this")
    p.add_argument("--within", default=None, help="only samples with a frame containing this")
    args = p.parse_args()
    per_thread = collections.Counter()
    self_time: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with open(args.profile) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            # py-spy --subprocesses puts 'process PID:"command line";' first, a child's after
            # its parent's (a command line may hold ';'): the server's process and the engine
            # process (multiprocessing's spawn) are told apart by the last.
            process = ""
            while stack.startswith("process ") and '";' in stack:
                command, _, stack = stack.partition('";')
                process = "engine process: " if "spawn_main" in command else "server process: "
            frames = stack.split(";")
            if args.within and not any(args.within in frame for frame in frames):
                continue
            # "thread (1234): name": the id varies from run to run, the name does not.
            thread = process + (frames[0].split(": ", 1)[-1].rstrip("_0123456789") or frames[0])
            if args.thread and not any(t in thread for t in args.thread):
                continue
            n = int(count)
            per_thread[thread] += n
            self_time[thread][frames[-1]] += n
            for frame in set(frames[1:]):
                inclusive[thread][frame] += n
    total = sum(per_thread.values())
    for thread, n in per_thread.most_common():
        print(f"== {thread}: {n} samples ({100 * n / total:.1f}%)")
        for title, table in (("self", self_time[thread]), ("inclusive", inclusive[thread])):
            print(f"  -- {title}")
            for frame, m in table.most_common(args.top):
                print(f"  {100 * m / n:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
