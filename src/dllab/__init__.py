"""dllab: learn and do deep learning on images, built on PyTorch.

    import dllab
    from dllab.train import train
    run = train("vae", {"epochs": 1, "limit": 256, "out": "runs/vae-api"})
    loaded = dllab.load_run("runs/vae-api")   # loaded.model: the VAE, rebuilt from the checkpoint

``load_run`` comes from :mod:`dllab.train` and is imported on first use, so that ``import dllab``
stays light (the command line imports only what a command needs).
"""

__version__ = "0.1.0"

__all__ = ["load_run", "__version__"]


def __getattr__(name: str):
    if name == "load_run":
        import importlib

        return importlib.import_module("dllab.train").load_run
    raise AttributeError(f"module 'dllab' has no attribute {name!r}")
