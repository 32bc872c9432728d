"""Placeholder tokens and the texts that pair images with conditions and skin types."""

from skindiff.core.labels import slug

# Captions of Textual Inversion training: the reference code's own list ("skin_disease_prompt").
REFERENCE_TI_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a close-up photo of a {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a rendition of a {}",
)
# The object templates of the diffusers Textual Inversion example (ImageNet's prompt templates),
# which the reference code leaves commented out.
IMAGENET_OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)
INITIALIZER_WORD = "skin"

# How captions and prompts name a Fitzpatrick skin type.
SKIN_TYPE_PHRASES = {
    1: "a very light-skinned",
    2: "a light-skinned",
    3: "a medium light-skinned",
    4: "a medium dark-skinned",
    5: "a dark-skinned",
    6: "a very dark-skinned",
}
SKIN_PROMPT = "An image of {concept} on the skin of {phrase} individual"
# Generic skin marks of the built-in model's pretraining corpus, as its captions name them (none
# is one of the study's conditions): mark -> words.
SKIN_MARKS = {
    "none": "healthy skin",
    "mole": "a mole",
    "freckles": "freckles",
    "scratch": "a scratch",
    "spot": "a red spot",
    "hair": "hairs",
    "birthmark": "a birthmark",
    "bruise": "a bruise",
    "scar": "a scar",
    "rash": "a rash",
    "ring": "a ring",
    "spots": "spots",
    "patch": "a patch",
    "lesion": "a lesion",
    "streak": "a streak",
}


def placeholder_token(condition: str) -> str:
    """`basal cell carcinoma` -> `<basal-cell-carcinoma>`: one new token per condition, made of
    its slug, so it holds no space for the tokenizer to split it at, names a file, and two
    conditions have one token only where they have one slug."""
    return "<" + slug(condition).replace("_", "-") + ">"


def skin_prompt(concept: str, fitzpatrick_scale: int) -> str:
    """LoRA caption and generation prompt: the concept (token or words) on a skin type."""
    if fitzpatrick_scale not in SKIN_TYPE_PHRASES:
        raise ValueError(f"no phrase for Fitzpatrick skin type {fitzpatrick_scale}")
    return SKIN_PROMPT.format(concept=concept, phrase=SKIN_TYPE_PHRASES[fitzpatrick_scale])
