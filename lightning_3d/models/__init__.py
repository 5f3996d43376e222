from lightning_3d.models.llama import Transformer

__all__ = ["Transformer"]
