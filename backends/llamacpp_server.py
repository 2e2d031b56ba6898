"""Child process that runs llama.cpp's server (the prebuilt xllamacpp wheel) for the node.

Prints one line, 'listening HOST:PORT', once the socket is bound (the model may still be loading:
the server answers /health with 503 until it is ready). Exits on SIGTERM, SIGINT, or when its stdin
closes, so the server never outlives a node that was killed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--alias", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--http-threads", type=int, default=16)
    parser.add_argument("--embedding", action="store_true")
    args = parser.parse_args(argv)

    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx
    params.n_parallel = args.parallel
    # One thread: on a 2-core machine two spinning threads contend with the HTTP thread (~10x slower).
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.model_alias = {args.alias}
    params.n_threads_http = args.http_threads
    params.endpoint_metrics = True
    params.endpoint_slots = True
    params.embedding = args.embedding
    if args.embedding:
        # The OpenAI embeddings endpoint needs one vector per input, i.e. a pooled embedding.
        params.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    params.verbosity = 1
    server = xlc.Server(params)
    print("listening", server.listening_address, flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    del server


if __name__ == "__main__":
    main()
