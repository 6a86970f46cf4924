"""saelib: k-sparse (TopK) autoencoders on language-model activations.

The recipe of Gao et al., "Scaling and evaluating sparse autoencoders": TopK SAEs with tied
init, geometric-median ``b_pre``, unit-norm decoder rows, AuxK against dead latents and a
learning rate that scales as ``1/sqrt(n_latents)``.
"""

__version__ = "0.1.0"

from .normalize import Normalizer
from .sae import ForwardOutput, Latents, TopKSAE, load
from .config import TrainConfig
from .train import BatchSource, TensorSource, fit

__all__ = ["TopKSAE", "Latents", "ForwardOutput", "load", "fit", "TrainConfig", "BatchSource", "TensorSource",
           "Normalizer", "__version__"]
