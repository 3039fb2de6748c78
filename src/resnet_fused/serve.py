"""Serving a fused model on Ray Serve: replicas (each process holds its own copy of the model and
runs it on its own cores) behind one HTTP endpoint, requests batched dynamically per replica.

    pip install .[serve]
    python -c "import torch, torchvision, resnet_fused; \\
        torch.save(resnet_fused.fuse(torchvision.models.resnet50().eval()), 'fused.pt')"
    python -m resnet_fused.serve fused.pt --input-shape 3 224 224 --replicas 2 --port 8000
    # POST http://127.0.0.1:8000/  {"image": [[[...]]]}  ->  {"logits": [...], "batch_size": n, "replica": "..."}

``fused.pt`` is a fused model saved with ``torch.save`` (or an exported program saved with
``torch.export.save``, named ``*.pt2``). ``--address`` joins a running Ray cluster (several
machines: replicas go wherever the cluster has CPUs; each machine needs resnet_fused installed and
the model file at the same path) instead of starting one here. Ctrl-C (or
SIGTERM) shuts Serve and the local cluster down.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def load_model(path: str):
    """A fused model saved with torch.save, or an exported program (``.pt2``), ready to call."""
    import torch

    import resnet_fused  # noqa: F401  (the ops, before the model is unpickled or loaded)

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path!r}")
    if path.endswith(".pt2"):
        return torch.export.load(path).module()
    model = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{path!r} holds a {type(model).__name__}, not a model (save one with torch.save(fused, path))")
    return model.eval()


def warm_up(model, input_shape, max_batch_size: int) -> None:
    """Runs every batch size the server can form as it runs them (inference mode, a stacked float32
    batch) until it replays: each size measures its kernels (once per machine, then read from the
    cache) and records its ops at start-up rather than in the first requests of that size.
    Random images, not zeros: tuning checks each kernel's accuracy on the layer's first input.
    Twice over: a size whose kernel first takes a layer's weight into its own layout (once per
    layer) drops the recordings made before it, and the counts of calls before one records; the
    second pass makes them again."""
    import torch

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, *input_shape, generator=gen) for n in range(1, max_batch_size + 1)]
    with torch.inference_mode():
        for _ in range(2):
            for x in xs:
                for _ in range(4):  # (tuning, the module path, the call that records, a replay)
                    model(x)


def app(model_path: str, input_shape, *, replicas: int = 2, threads: int = 1, max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01, warm: bool = True):
    """The Ray Serve application: ``replicas`` copies of the model, each taking one image per
    request (a nested list of ``input_shape``, C x H x W) and running up to ``max_batch_size`` of
    them as one batch (waiting at most ``batch_wait_timeout_s`` for a batch to fill). ``warm``:
    each replica runs every batch size before it takes requests (warm_up)."""
    from ray import serve
    from starlette.responses import JSONResponse

    input_shape = tuple(int(s) for s in input_shape)
    if replicas < 1 or threads < 1 or max_batch_size < 1 or batch_wait_timeout_s < 0:
        raise ValueError("replicas, threads and max_batch_size must be at least 1, batch_wait_timeout_s at least 0")

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": threads})
    class FusedModel:
        def __init__(self):
            import torch

            torch.set_num_threads(threads)
            self.model = load_model(model_path)
            if warm:
                warm_up(self.model, input_shape, max_batch_size)
            self.replica = f"{os.uname().nodename}:{os.getpid()}"

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def predict(self, images):
            import torch

            with torch.inference_mode():
                logits = self.model(torch.stack(images))
            return [{"logits": row.tolist(), "batch_size": len(images), "replica": self.replica} for row in logits]

        async def __call__(self, request):
            import torch

            try:
                body = await request.json()
                image = torch.tensor(body["image"], dtype=torch.float32)
            except Exception as err:  # noqa: BLE001 - any malformed body is the client's error
                return JSONResponse({"error": f'expected JSON {{"image": nested list of {list(input_shape)}}}: {err}'},
                                    status_code=400)
            if tuple(image.shape) != input_shape:
                return JSONResponse({"error": f"image must have shape {list(input_shape)}, got {list(image.shape)}"},
                                    status_code=400)
            return await self.predict(image)

    return FusedModel.bind()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resnet_fused.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="fused model saved with torch.save (or an exported program, *.pt2)")
    p.add_argument("--input-shape", type=int, nargs="+", required=True, metavar="N", help="one image's shape, C H W")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per replica")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--no-warm-up", action="store_true",
                   help="take requests at once (each batch size's first request then tunes and records it)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="a running Ray cluster to join (default: start one here)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.model):
        p.error(f"no model file at {args.model!r}")
    try:
        import ray
        from ray import serve
    except ImportError:
        p.error("Ray Serve is not installed: pip install resnet_fused[serve] (or pip install 'ray[serve]')")

    application = app(args.model, args.input_shape, replicas=args.replicas, threads=args.threads,
                      max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                      warm=not args.no_warm_up)
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.replicas * args.threads, include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name="resnet_fused", route_prefix="/")
        print(f"resnet_fused: serving {args.model} on http://{args.host}:{args.port}/ "
              f"({args.replicas} replicas, batches of up to {args.max_batch_size})", flush=True)
        stop.wait()
    finally:
        print("resnet_fused: shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
