"""Does a process that compiled at several torch.compile sites take long to exit?

Seen with torch 2.11: a process that compiled (inductor) at more than one site sat about
300 s at exit, in inductor's shutdown_compile_workers waiting on a worker, and
TORCHINDUCTOR_COMPILE_THREADS=1 avoided it. This script starts a child process that
compiles N small functions with inductor, one site each, and prints when the child's main
returned and when the child process had exited; the difference is the exit delay.
With ``--os-exit`` the child ends as the benchmark scripts do: output flushed, then
``os._exit``, which skips interpreter shutdown (atexit handlers, the compile-worker pool's
shutdown), so its exit delay is the process teardown alone.

    python benchmarks/compile_exit_probe.py                  # CPU, 2 sites
    python benchmarks/compile_exit_probe.py --device cuda --sites 3
    python benchmarks/compile_exit_probe.py --device cuda --sites 3 --os-exit
    TORCHINDUCTOR_COMPILE_THREADS=1 python benchmarks/compile_exit_probe.py

Exit status 1 when the exit delay is above --max-exit-s (default 30).
"""
import argparse
import os
import subprocess
import sys
import time


def child(device, sites, os_exit):
    import torch

    x = torch.randn(64, 64, device=device)
    for i in range(sites):
        # Distinct code objects, so each is its own compile site.
        source = f"def f{i}(x):\n    return torch.relu(x @ x.T + {i}).sum(dim=1).softmax(0)\n"
        scope = {"torch": torch}
        exec(compile(source, f"<site{i}>", "exec"), scope)  # noqa: S102 (fixed local source)
        start = time.perf_counter()
        torch.compile(scope[f"f{i}"], backend="inductor")(x)
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"site {i}: compiled and ran in {time.perf_counter() - start:.1f} s", flush=True)
    print(f"MAIN_DONE {time.time():.3f}", flush=True)
    if os_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--max-exit-s", type=float, default=30.0)
    parser.add_argument("--os-exit", action="store_true",
                        help="the child leaves with os._exit once its output is flushed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.device, args.sites, args.os_exit)
        return 0

    import torch

    threads = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "(unset)")
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}, device {args.device}, "
          f"{args.sites} sites, TORCHINDUCTOR_COMPILE_THREADS={threads}, child ends with "
          f"{'os._exit' if args.os_exit else 'a normal exit'}", flush=True)
    start = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", "--device", args.device,
                           "--sites", str(args.sites)] + (["--os-exit"] if args.os_exit else []),
                          capture_output=True, text=True)
    ended = time.time()
    print(proc.stdout, end="")
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        print(f"child failed with exit status {proc.returncode}")
        return 2
    done = [line for line in proc.stdout.splitlines() if line.startswith("MAIN_DONE ")]
    main_done = float(done[-1].split()[1])
    delay = ended - main_done
    print(f"child: {ended - start:.1f} s in all, of which {delay:.1f} s after its main returned "
          f"(exit delay; limit {args.max_exit_s:.0f} s)")
    return 1 if delay > args.max_exit_s else 0


if __name__ == "__main__":
    sys.exit(main())
