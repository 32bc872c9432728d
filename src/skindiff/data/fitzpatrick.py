"""Facts of the Fitzpatrick17k metadata format and of the paper's cohort."""

# Columns a metadata CSV must have; the rest of the Fitzpatrick17k columns are optional.
REQUIRED_COLUMNS = ("md5hash", "fitzpatrick_scale", "label")
# All columns of the public Fitzpatrick17k CSV, in its order (the demo dataset writes these).
FITZPATRICK17K_COLUMNS = (
    "md5hash",
    "fitzpatrick_scale",
    "fitzpatrick_centaur",
    "label",
    "nine_partition_label",
    "three_partition_label",
    "qc",
    "url",
    "url_alphanum",
)
UNKNOWN_FST = -1
VALID_FST = (UNKNOWN_FST, 1, 2, 3, 4, 5, 6)

# The paper's seven conditions (alphabetical, which is also the classifiers' label order).
CONDITIONS = (
    "basal cell carcinoma",
    "folliculitis",
    "nematode infection",
    "neutrophilic dermatoses",
    "prurigo nodularis",
    "psoriasis",
    "squamous cell carcinoma",
)
# Partition labels of the seven conditions in Fitzpatrick17k (nine-way, three-way).
PARTITIONS = {
    "basal cell carcinoma": ("malignant epidermal", "malignant"),
    "folliculitis": ("inflammatory", "non-neoplastic"),
    "nematode infection": ("inflammatory", "non-neoplastic"),
    "neutrophilic dermatoses": ("inflammatory", "non-neoplastic"),
    "prurigo nodularis": ("benign epidermal", "benign"),
    "psoriasis": ("inflammatory", "non-neoplastic"),
    "squamous cell carcinoma": ("malignant epidermal", "malignant"),
}

LIGHT_FST = (1, 2)  # majority group
DARK_FST = (5, 6)  # minority group
FLEXIBLE_PER_CONDITION = 8
PAPER_SEEDS = (0, 42, 123, 1111, 1234)
