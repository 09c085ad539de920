"""Training engines behind one small interface (``Engine``): plain PyTorch on one device, or DeepSpeed."""

from tsvd.engine.base import Engine, StepResult


def build_engine(cfg, model) -> Engine:
    """The engine named by ``cfg.engine.kind``, wrapping ``model`` (built by the caller)."""
    if cfg.engine.kind == "deepspeed":
        from tsvd.engine.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model)
    from tsvd.engine.torch_engine import TorchEngine

    return TorchEngine(cfg, model)


__all__ = ["Engine", "StepResult", "build_engine"]
