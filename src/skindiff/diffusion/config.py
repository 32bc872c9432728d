"""Settings of the generator stages: Textual Inversion, LoRA and generation.

Defaults are the reference code's: Textual Inversion one token per condition from the word
"skin", each trained on its own condition's images for 500 steps of batch 4 x accumulation 4 at
lr 5e-4 scaled by batch x accumulation;
LoRA rank 8, alpha 8 on to_q/to_k/to_v/to_out.0, lr 5e-6, 3000 steps of batch 4, gradient
norm clipped at 1; img2img at strength 0.5 with 100 scheduler steps, guidance 2.0, 5 images
per training image, the model's own scheduler, light sources moved to FST 5 or 6.
"""

from dataclasses import dataclass
from enum import StrEnum

from skindiff.core.labels import label_key_problem
from skindiff.core.settings import Precision, Settings, check_seed, setting
from skindiff.data.fitzpatrick import CONDITIONS, DARK_FST
from skindiff.diffusion.prompts import (
    IMAGENET_OBJECT_TEMPLATES,
    INITIALIZER_WORD,
    REFERENCE_TI_TEMPLATES,
    SKIN_TYPE_PHRASES,
)
from skindiff.errors import require


class Pipeline(StrEnum):
    IMG2IMG = "img2img"
    TXT2IMG = "txt2img"


class GenerationMode(StrEnum):
    """A pipeline and the adapters it uses; vanilla = the base model, the condition in words."""

    IMG2IMG_TI_LORA = "img2img/ti+lora"  # the paper's method
    IMG2IMG_TI = "img2img/ti"
    IMG2IMG_LORA = "img2img/lora"
    IMG2IMG_VANILLA = "img2img/vanilla"
    TXT2IMG_TI = "txt2img/ti"
    TXT2IMG_VANILLA = "txt2img/vanilla"

    @property
    def pipeline(self) -> Pipeline:
        return _MODE_PARTS[self][0]

    @property
    def uses_ti(self) -> bool:
        return _MODE_PARTS[self][1]

    @property
    def uses_lora(self) -> bool:
        return _MODE_PARTS[self][2]


# mode -> (pipeline, uses Textual Inversion tokens, uses LoRA weights)
_MODE_PARTS = {
    GenerationMode.IMG2IMG_TI_LORA: (Pipeline.IMG2IMG, True, True),
    GenerationMode.IMG2IMG_TI: (Pipeline.IMG2IMG, True, False),
    GenerationMode.IMG2IMG_LORA: (Pipeline.IMG2IMG, False, True),
    GenerationMode.IMG2IMG_VANILLA: (Pipeline.IMG2IMG, False, False),
    GenerationMode.TXT2IMG_TI: (Pipeline.TXT2IMG, True, False),
    GenerationMode.TXT2IMG_VANILLA: (Pipeline.TXT2IMG, False, False),
}


class SchedulerName(StrEnum):
    """Sampling scheduler; `default` keeps the base model's own (PNDM for SD 2.1 base)."""

    DEFAULT = "default"
    PNDM = "pndm"
    DDIM = "ddim"
    DPM_PLUS_PLUS = "dpm++"
    EULER = "euler"
    EULER_ANCESTRAL = "euler-a"


class GeneratorImages(StrEnum):
    """The images Textual Inversion and LoRA train on. The validation split only selects the
    classifier's epoch, and the paper's generator trains on the whole training set."""

    TRAIN_VAL = "train+val"  # the scenario's whole training set (the paper's)
    TRAIN = "train"  # without the validation split: the generator never sees it

    @property
    def splits(self) -> tuple[str, ...]:
        """The prepare run's splits these images are."""
        return ("train", "val") if self == GeneratorImages.TRAIN_VAL else ("train",)


GENERATOR_IMAGES_HELP = (
    "Images Textual Inversion and LoRA train on: train+val (the scenario's whole training set, "
    "as the paper; the classifier's validation images are then seen by the generator) or "
    "train (without the validation split)."
)


class TiTemplates(StrEnum):
    """The caption templates Textual Inversion draws from."""

    REFERENCE = "reference"  # the reference code's 11
    IMAGENET_OBJECT = "imagenet-object"  # the diffusers example's 27 object templates

    @property
    def texts(self) -> tuple[str, ...]:
        return {
            TiTemplates.REFERENCE: REFERENCE_TI_TEMPLATES,
            TiTemplates.IMAGENET_OBJECT: IMAGENET_OBJECT_TEMPLATES,
        }[self]


class FrozenWeights(StrEnum):
    """The dtype of LoRA's frozen UNet, VAE and text encoder under fp16 or bf16 mixed
    precision: float32 (autocast does the half-precision math) or the half-precision type."""

    FULL = "full"
    HALF = "half"


class MicroBatchPasses(StrEnum):
    """How a training step runs its micro-batches (accumulation): each in its own forward and
    backward pass (the least memory) or all in one (fewer, larger operations: on a CPU a step
    of 4 x 4 images then takes about half the time). Each micro-batch draws its noise from its
    own generator either way, so joining changes only the order of the gradient's additions."""

    AUTO = "auto"  # joined on a CPU, where memory is rarely the limit; separate on a GPU
    JOINED = "joined"
    SEPARATE = "separate"


MICRO_BATCH_PASSES_HELP = (
    "auto (joined on a CPU, separate on a GPU), joined (a step's micro-batches in one "
    "forward/backward pass: faster, memory of batch x accumulation images) or separate (one "
    "pass per micro-batch: the least memory). Results agree to float rounding."
)
BASE_MODEL_HELP = (
    "tiny (built-in, CPU-sized, pretrained on procedural skin), tiny-random (its architecture, "
    "random weights), sd21-random (full SD 2.1-base architecture, random weights), a local "
    "diffusers folder, or a hub id such as stabilityai/stable-diffusion-2-1-base."
)
RESOLUTION_HELP = "Training and img2img resolution in pixels; 0 = the model's native size."
PRECISION_HELP = (
    "auto (fp16 on a GPU, full on a CPU), no, fp16 (a GPU only) or bf16 (a GPU, or a CPU: "
    "torch's CPU autocast). A NaN or inf loss or image stops the stage, naming the step."
)
SEED_HELP = "Seed of the stage's randomness."


def _check_training(config: "TextualInversionConfig | LoraConfig") -> None:
    """The checks of the fields Textual Inversion and LoRA share."""
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps"):
        value = getattr(config, name)
        require(value >= 1, f"{name} must be at least 1, got {value}")
    require(
        config.checkpoint_every >= 1,
        f"checkpoint_every must be at least 1, got {config.checkpoint_every}",
    )
    require(config.learning_rate > 0, f"learning_rate must be positive, got {config.learning_rate}")
    require(config.weight_decay >= 0, f"weight_decay must be >= 0, got {config.weight_decay}")
    _check_model(config)


def _check_model(config: "TextualInversionConfig | LoraConfig | GenerateConfig") -> None:
    check_seed("seed", config.seed)
    require(
        config.resolution >= 0 and config.resolution % 8 == 0,
        f"resolution must be 0 (native) or a positive multiple of 8, got {config.resolution}",
    )
    require(bool(config.base_model), "base_model is empty: use 'tiny', a folder or a hub id")


@dataclass(frozen=True)
class TextualInversionConfig(Settings):
    """Settings of a Textual Inversion run."""

    base_model: str = setting("tiny", BASE_MODEL_HELP)
    conditions: tuple[str, ...] = setting(CONDITIONS, "Conditions to learn a token for.")
    generator_images: GeneratorImages = setting(GeneratorImages.TRAIN_VAL, GENERATOR_IMAGES_HELP)
    num_vectors: int = setting(1, "Textual Inversion: embedding vectors per token.")
    initializer_word: str = setting(
        INITIALIZER_WORD, "Textual Inversion: the word whose embedding starts every token."
    )
    templates: TiTemplates = setting(
        TiTemplates.REFERENCE,
        "Textual Inversion captions: reference (the reference code's 11 templates, 'a photo "
        "of a {}', ...) or imagenet-object (the diffusers example's 27 object templates, with "
        "'a dark photo of the {}', 'a photo of a clean {}', ...).",
    )
    max_train_steps: int = setting(
        500,
        "Textual Inversion: optimizer steps (each token's own with per_token, else all "
        "tokens' together).",
    )
    per_token: bool = setting(
        True,
        "true: every token trains on batches of its own condition's images, as the reference's "
        "one run per condition; false: batches mixing all conditions (cheaper, each token sees "
        "its condition's share).",
    )
    train_batch_size: int = setting(4, "Textual Inversion: images per micro-batch.")
    gradient_accumulation_steps: int = setting(
        4, "Textual Inversion: micro-batches per optimizer step."
    )
    micro_batch_passes: MicroBatchPasses = setting(MicroBatchPasses.AUTO, MICRO_BATCH_PASSES_HELP)
    learning_rate: float = setting(5e-4, "Textual Inversion: AdamW learning rate before scaling.")
    scale_lr: bool = setting(
        True, "true: multiply the learning rate by batch x accumulation (reference)."
    )
    weight_decay: float = setting(1e-2, "Textual Inversion: AdamW weight decay.")
    resolution: int = setting(0, RESOLUTION_HELP)
    mixed_precision: Precision = setting(Precision.AUTO, PRECISION_HELP)
    checkpoint_every: int = setting(100, "Textual Inversion: steps between resumable checkpoints.")
    seed: int = setting(0, SEED_HELP)

    def check(self) -> None:
        _check_training(self)
        require(self.num_vectors >= 1, f"num_vectors must be at least 1, got {self.num_vectors}")
        require(len(self.conditions) > 0, "conditions is empty")
        # A condition's token, tag and loss curve are named by its slug.
        problem = label_key_problem(self.conditions)
        require(problem is None, f"conditions: {problem}")


@dataclass(frozen=True)
class LoraConfig(Settings):
    """Settings of a LoRA run."""

    base_model: str = setting("tiny", BASE_MODEL_HELP)
    generator_images: GeneratorImages = setting(GeneratorImages.TRAIN_VAL, GENERATOR_IMAGES_HELP)
    rank: int = setting(8, "LoRA: rank of the adapter matrices.")
    alpha: int = setting(8, "LoRA: scaling alpha (the update is scaled by alpha / rank).")
    target_modules: tuple[str, ...] = setting(
        ("to_q", "to_k", "to_v", "to_out.0"),
        "LoRA: comma list of UNet attention modules to adapt.",
    )
    learning_rate: float = setting(5e-6, "LoRA: AdamW learning rate.")
    max_train_steps: int = setting(3000, "LoRA: optimizer steps.")
    train_batch_size: int = setting(4, "LoRA: images per micro-batch.")
    gradient_accumulation_steps: int = setting(1, "LoRA: micro-batches per optimizer step.")
    micro_batch_passes: MicroBatchPasses = setting(MicroBatchPasses.AUTO, MICRO_BATCH_PASSES_HELP)
    weight_decay: float = setting(1e-2, "LoRA: AdamW weight decay.")
    max_grad_norm: float = setting(1.0, "LoRA: gradient clipping norm (0 = none).")
    snr_gamma: float = setting(0.0, "LoRA: Min-SNR loss weighting gamma (0 = off; 5 is common).")
    gradient_checkpointing: bool = setting(False, "true: trade compute for memory in the UNet.")
    frozen_weights: FrozenWeights = setting(
        FrozenWeights.FULL,
        "LoRA under fp16/bf16 mixed precision: full (the frozen UNet, VAE and text encoder stay "
        "float32, as in the reference's fp16 run, and autocast does the half-precision math; "
        "the frozen weights take twice the memory: SD 2.1's UNet 3.5 GB instead of 1.7) or "
        "half (cast to fp16/bf16). No effect without mixed precision.",
    )
    resolution: int = setting(0, RESOLUTION_HELP)
    mixed_precision: Precision = setting(Precision.AUTO, PRECISION_HELP)
    checkpoint_every: int = setting(500, "LoRA: steps between resumable checkpoints.")
    seed: int = setting(0, SEED_HELP)

    def check(self) -> None:
        _check_training(self)
        require(self.rank >= 1, f"rank must be at least 1, got {self.rank}")
        require(self.alpha > 0, f"alpha must be positive, got {self.alpha}")
        require(len(self.target_modules) > 0, "target_modules is empty")
        require(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        require(self.snr_gamma >= 0, f"snr_gamma must be >= 0 (0 = off), got {self.snr_gamma}")


@dataclass(frozen=True)
class GenerateConfig(Settings):
    """Settings of the `generate` stage."""

    base_model: str = setting("tiny", BASE_MODEL_HELP)
    mode: GenerationMode = setting(
        GenerationMode.IMG2IMG_TI_LORA,
        "pipeline/adapters: img2img/ti+lora (the paper's method), img2img/ti, img2img/lora, "
        "img2img/vanilla, txt2img/ti, txt2img/vanilla.",
    )
    num_per_image: int = setting(5, "Synthetic images per training image.")
    strength: float = setting(
        0.5, "img2img: how far from the source image (0-1; 0.5 = half the steps)."
    )
    guidance_scale: float = setting(2.0, "Classifier-free guidance scale.")
    num_inference_steps: int = setting(100, "Scheduler steps (img2img runs strength x this many).")
    scheduler: SchedulerName = setting(
        SchedulerName.DEFAULT,
        "default (the model's own: PNDM for SD 2.1 base), pndm, ddim, dpm++, euler, euler-a.",
    )
    resolution: int = setting(0, RESOLUTION_HELP)
    output_size: int = setting(256, "Side of the saved synthetic images in pixels.")
    generation_batch_size: int = setting(16, "Images per pipeline call.")
    compile_unet: bool = setting(
        False,
        "true: the UNet runs compiled by torch.compile (needs a C++ compiler on a CPU): "
        "compiling takes seconds to a minute per batch shape, the first time on a machine, "
        "then each step is faster (tiny on a CPU: 1.4x). Pays off for long runs; the images "
        "differ from uncompiled ones at float rounding.",
    )
    target_fst: tuple[int, ...] = setting(
        DARK_FST,
        "Comma list of skin types a light source image is moved to (one drawn per source, "
        "shared by its variants); dark sources keep their own.",
    )
    mixed_precision: Precision = setting(Precision.AUTO, PRECISION_HELP)
    seed: int = setting(0, SEED_HELP)
    skin_tone_filter: bool = setting(
        False,
        "true: an image whose skin tone (ITA) misses its target skin type is replaced by one "
        "from a new seed, up to skin_tone_retries times; what still misses is left out of "
        "classifier training (kept=false). The paper does not filter.",
    )
    skin_tone_retries: int = setting(3, "New seeds tried per off-target image (skin_tone_filter).")
    dark_ita_max: float = setting(
        10.0,
        "Highest ITA (degrees) on target for FST 5-6 (10: brown or dark); FST 3-4 are on target "
        "between this and light_ita_min.",
    )
    light_ita_min: float = setting(
        28.0, "ITA (degrees) above which FST 1-2 are on target (28: intermediate or lighter)."
    )

    def check(self) -> None:
        _check_model(self)
        problems = []
        if self.skin_tone_retries < 0:
            problems.append(f"skin_tone_retries must be >= 0, got {self.skin_tone_retries}")
        if not self.dark_ita_max < self.light_ita_min:
            problems.append(
                f"dark_ita_max ({self.dark_ita_max}) must be below light_ita_min "
                f"({self.light_ita_min})"
            )
        if self.pipeline == Pipeline.IMG2IMG and not 0 < self.strength <= 1:
            problems.append(f"strength must be in (0, 1] for img2img, got {self.strength}")
        elif (
            self.pipeline == Pipeline.IMG2IMG and int(self.strength * self.num_inference_steps) < 1
        ):
            problems.append(
                f"strength x num_inference_steps must give at least one denoising step, got "
                f"{self.strength} x {self.num_inference_steps}"
            )
        for name in (
            "num_per_image",
            "num_inference_steps",
            "generation_batch_size",
            "output_size",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.target_fst or any(fst not in SKIN_TYPE_PHRASES for fst in self.target_fst):
            problems.append(f"target_fst must be Fitzpatrick types 1..6, got {self.target_fst}")
        require(not problems, "; ".join(problems))

    @property
    def pipeline(self) -> Pipeline:
        return self.mode.pipeline

    @property
    def uses_ti(self) -> bool:
        return self.mode.uses_ti

    @property
    def uses_lora(self) -> bool:
        return self.mode.uses_lora


@dataclass(frozen=True)
class PretrainConfig(Settings):
    """How the `tiny` architecture is pretrained on the procedural skin corpus."""

    seed: int = setting(0, "Seed of the corpus, the initial weights and every draw.")
    corpus_size: int = setting(4096, "Captioned skin images in the pretraining corpus.")
    vae_steps: int = setting(2500, "Autoencoder optimizer steps.")
    unet_steps: int = setting(3000, "UNet optimizer steps.")
    batch_size: int = setting(16, "Images per optimizer step.")
    vae_learning_rate: float = setting(2e-3, "Autoencoder AdamW learning rate (cosine decay).")
    unet_learning_rate: float = setting(1e-3, "UNet AdamW learning rate (cosine decay).")
    caption_dropout: float = setting(
        0.1, "Share of captions replaced by the empty one (for classifier-free guidance)."
    )
    offset_noise: float = setting(
        0.5,
        "Scale of a per-image, per-channel constant added to the training noise, so that the "
        "UNet learns the overall skin tone from the caption rather than from the noise (img2img "
        "at strength 0.5 then moves the skin to the prompt's type).",
    )

    def check(self) -> None:
        for name in ("corpus_size", "vae_steps", "unet_steps", "batch_size"):
            value = getattr(self, name)
            require(value >= 1, f"{name} must be at least 1, got {value}")
        for name in ("vae_learning_rate", "unet_learning_rate"):
            value = getattr(self, name)
            require(value > 0, f"{name} must be positive, got {value}")
        require(
            0 <= self.caption_dropout < 1,
            f"caption_dropout must be in [0, 1), got {self.caption_dropout}",
        )
        check_seed("seed", self.seed)


@dataclass(frozen=True)
class PretrainTarget(Settings):
    output_dir: str | None = setting(None, "New folder for the model (must not exist).")

    def check(self) -> None:
        require(self.output_dir is not None, "output_dir is empty: name a new folder")
