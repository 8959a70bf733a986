"""Sparse autoencoders seeded from ITDA dictionaries: architectures, model, initialisations, trainer,
evaluation, I/O."""

from itda.sae.arch import ARCH_NAMES, ARCHS, Architecture, get_arch  # noqa: F401
from itda.sae.coder import SaeCoder  # noqa: F401,E402  (registers LoadedSae with itda.evaluation.coder.as_coder)
from itda.sae.evaluate import SaeEvalReport, SaeEvaluator, evaluate_sae  # noqa: F401
from itda.sae.init import INIT_NAMES, InitSpec, initialise, new_sae, parse_init  # noqa: F401
from itda.sae.io import LoadedSae, SaeMeta, export_saelens, export_sparsify, load_sae, save_sae  # noqa: F401
from itda.sae.model import EncoderOutput, ForwardOutput, SaeConfig, TopKSAE  # noqa: F401
from itda.sae.train import SaeTrainer, StepStats, TrainConfig, rebatch, shuffled_batches  # noqa: F401
