"""The embedded default: serve a bundled model (SmolLM2-135M-Instruct unless --model says
otherwise) with the plugin and that model's shipped probe on 127.0.0.1.

    python -m tokenwise_safety.launch.serve [--model smollm2|qwen-0.5b|qwen-1.5b|gemma3-270m]
                                            [--port 30000] [extra sglang flags...]

Prepares the model if needed, starts `python -m sglang.launch_server ... --safety-plugin
tokenwise --sleep-on-idle`, prints the dtype it chose for this CPU and why, prints the URL
when it answers, and runs until interrupted.
"""
from __future__ import annotations

import argparse
import signal
import sys

from tokenwise_safety.bundled import DEFAULT_MODEL, MODELS, prepare, probe_path
from tokenwise_safety.launch.server import Server


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL, help="bundled model to serve")
    ap.add_argument("--safety-mode", default="shadow")
    ap.add_argument("--safety-probe", help="probe artifact (default: the one shipped for --model)")
    args, extra = ap.parse_known_args(argv)
    probe = args.safety_probe or probe_path(args.model)
    if probe is None:
        ap.error(f"no probe ships for {args.model} yet: calibrate one with `python -m tokenwise_safety.calibrate "
                 f"--model {args.model} --out probes/{args.model}.json` and pass --safety-probe probes/{args.model}.json")
    model = prepare(args.model)
    server = Server(model, safety=["--safety-probe", str(probe), "--safety-mode", args.safety_mode],
                    extra=extra, port=args.port, inherit_output=True, timeout=600)
    print(f"[tokenwise serve] dtype {server.dtype}: {server.dtype_reason} (override: --dtype)",
          file=sys.stderr, flush=True)
    print(f"[tokenwise serve] starting: {' '.join(server.cmd)}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.start()
        print(f"[tokenwise serve] ready: {server.url}   try: curl {server.url}/generate "
              "-H 'Content-Type: application/json' -d '{\"text\": \"Hello\"}'", flush=True)
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()

if __name__ == "__main__":
    main()
