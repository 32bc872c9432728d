"""Near-duplicate images in a cohort: the same photograph under two md5hashes (re-encoded,
resized, cropped, watermarked), as Fitzpatrick17k holds by the hundred. A copy on both sides of
a train/test boundary inflates exactly the dark-test scores the study measures.

Two images are near-duplicates when their pHashes differ in at most `hash_distance` bits, or
their features (see `data.image_signatures`) have a cosine similarity of at least `similarity`:
for thumbnails, the best over one image's crops against the other's whole view, either way
round. Pairs link into clusters (connected components).
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from skindiff.data.config import DuplicateFeatures, PrepareConfig
from skindiff.data.image_signatures import open_small, resolve_features

NO_SPLIT = "none"  # a cohort image in none of the scenario's splits
TRAINING_SPLITS = ("train", "val")
# thumbnails: the lowest threshold at which the demo's planted copies are all found and none of
# its other images is flagged (benchmarks' near_duplicates); resnet18: not calibrated offline
# (no weights here), a conservative value
DEFAULT_SIMILARITY = {DuplicateFeatures.THUMBNAILS: 0.942, DuplicateFeatures.RESNET18: 0.95}
CSV_ROWS = 10_000  # the CSV's cap: every pair is still counted in the metrics
FIGURE_PAIRS = 8
ONE_CLUSTER_SHARE = 0.5  # a cluster holding more of the cohort than this is suspect
CHUNK = 128  # images compared against all others at once (memory: CHUNK x images x views)
PAIR_COLUMNS = (
    "md5hash_a",
    "md5hash_b",
    "split_a",
    "split_b",
    "label_a",
    "label_b",
    "fst_a",
    "fst_b",
    "hash_distance",
    "similarity",
    "cluster",
)


@dataclass(frozen=True)
class DuplicateRule:
    """When two images count as near-duplicates."""

    features: DuplicateFeatures  # resolved: never auto
    similarity: float
    hash_distance: int  # -1: the hash is not used

    @classmethod
    def of(cls, config: PrepareConfig) -> "DuplicateRule":
        features = resolve_features(config.near_duplicate_features)
        similarity = config.near_duplicate_similarity
        if similarity is None:
            similarity = DEFAULT_SIMILARITY[features]
        return cls(features, similarity, config.near_duplicate_hash_distance)

    def describe(self) -> str:
        hashed = f" or pHash distance <= {self.hash_distance}" if self.hash_distance >= 0 else ""
        return f"{self.features} similarity >= {self.similarity}{hashed}"


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / (np.linalg.norm(vectors, axis=-1, keepdims=True) + 1e-12)


def similar_pairs(hashes: np.ndarray, views: np.ndarray, rule: DuplicateRule) -> pd.DataFrame:
    """Every near-duplicate pair: columns a < b (row positions), hash_distance, similarity.
    `views` is (images, views, dimensions), the whole image first."""
    views = np.asarray(views, np.float32)
    if rule.features != DuplicateFeatures.THUMBNAILS:
        # ReLU features all point into one orthant, where even unrelated images have cosine
        # near 1; about the cohort's mean only alike images do
        views = views - views[:, 0].mean(0)
    views = _unit(views)
    n, k, d = views.shape
    whole, every_view = views[:, 0], views.reshape(n * k, d)
    hashes = np.asarray(hashes, np.uint64)
    found = []
    for start in range(0, n, CHUNK):
        rows = slice(start, min(start + CHUNK, n))
        # best over a's views against b's whole image (b is a crop of a), b's views against
        # a's whole image, and each view against the same view (a caption or a border in
        # one image is cut off by a crop of both)
        mine = (views[rows].reshape(-1, d) @ whole.T).reshape(-1, k, n).max(1)
        theirs = (every_view @ whole[rows].T).reshape(n, k, -1).max(1).T
        alike = np.max([views[rows, v] @ views[:, v].T for v in range(k)], axis=0)
        similarity = np.maximum(np.maximum(mine, theirs), alike)
        distance = np.bitwise_count(hashes[rows, None] ^ hashes[None, :]).astype(np.int16)
        near = (similarity >= rule.similarity) | (distance <= rule.hash_distance)
        a, b = np.nonzero(near)
        keep = b > a + start
        a, b = a[keep], b[keep]
        found.append((a + start, b, distance[a, b], similarity[a, b]))
    a, b, distance, similarity = (np.concatenate(parts) for parts in zip(*found, strict=True))
    return pd.DataFrame(
        {"a": a, "b": b, "hash_distance": distance, "similarity": similarity.round(4)}
    )


def clusters(pairs: pd.DataFrame, n_images: int) -> np.ndarray:
    """Per image, its cluster number (1 = the largest) or 0 where it has no near-duplicate."""
    graph = coo_matrix(
        (np.ones(len(pairs), np.int8), (pairs["a"], pairs["b"])), shape=(n_images, n_images)
    )
    _, component = connected_components(graph, directed=False)
    linked = np.zeros(n_images, bool)
    linked[pairs["a"]] = linked[pairs["b"]] = True
    sizes = np.bincount(component[linked], minlength=component.max() + 1)
    order = np.argsort(-sizes, kind="stable")
    number = np.zeros(len(sizes), np.int64)
    number[order[sizes[order] > 0]] = np.arange(1, (sizes > 0).sum() + 1)
    return np.where(linked, number[component], 0)


@dataclass(frozen=True)
class NearDuplicateReport:
    """The near-duplicate pairs of a cohort whose rows carry their scenario `split`."""

    rule: DuplicateRule
    rows: pd.DataFrame  # md5hash, split, label, fitzpatrick_scale, path; position = pair index
    pairs: pd.DataFrame  # a, b, hash_distance, similarity, cluster: every pair, closest first

    @cached_property
    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        split = self.rows["split"].to_numpy()
        return split[self.pairs["a"]], split[self.pairs["b"]]

    @cached_property
    def crossing(self) -> np.ndarray:
        """Per pair: one image in test, the other in train or validation."""
        a, b = self._split
        test_a, test_b = a == "test", b == "test"
        return (test_a & np.isin(b, TRAINING_SPLITS)) | (test_b & np.isin(a, TRAINING_SPLITS))

    def _conflicts(self, column: str) -> int:
        values = self.rows[column].to_numpy()
        return int((values[self.pairs["a"]] != values[self.pairs["b"]]).sum())

    @cached_property
    def _crossing_sides(self) -> tuple[np.ndarray, np.ndarray]:
        """(test image, training image) row positions of each pair across the boundary."""
        a, _ = self._split
        crossing = self.pairs[self.crossing]
        a_tested = a[self.crossing] == "test"
        return (
            np.where(a_tested, crossing["a"], crossing["b"]),
            np.where(a_tested, crossing["b"], crossing["a"]),
        )

    @cached_property
    def training_copies(self) -> list[str]:
        """The train and validation images that near-duplicate a test image (md5hash)."""
        return sorted(set(self.rows["md5hash"].to_numpy()[self._crossing_sides[1]]))

    def metrics(self) -> dict[str, float]:
        tested, _ = self._crossing_sides
        cluster = self.pairs["cluster"]
        return {
            "n_near_duplicate_pairs": len(self.pairs),
            "n_near_duplicate_pairs_across_train_test": int(self.crossing.sum()),
            "n_near_duplicate_label_conflicts": self._conflicts("label"),
            "n_near_duplicate_fst_conflicts": self._conflicts("fitzpatrick_scale"),
            "n_near_duplicate_images": len(set(self.pairs["a"]) | set(self.pairs["b"])),
            "n_near_duplicate_clusters": int(cluster.max()) if len(cluster) else 0,
            "near_duplicate_largest_cluster": self.largest_cluster,
            "n_test_images_with_training_copy": len(set(tested)),
        }

    @cached_property
    def largest_cluster(self) -> int:
        if not len(self.pairs):
            return 0
        members = np.concatenate([self.pairs["a"], self.pairs["b"]])
        of_cluster = np.concatenate([self.pairs["cluster"]] * 2)
        return len(set(members[of_cluster == 1]))

    def warnings(self, dropped: bool = False) -> list[str]:
        """What a user should hear about, one line each (`dropped`: the training copies of
        test images were left out)."""
        said = []
        if self.crossing.any():
            done = (
                "left out of train and validation (--near-duplicates drop)"
                if dropped
                else "kept (--near-duplicates drop leaves them out of train and validation)"
            )
            said.append(
                f"{self.crossing.sum()} near-duplicate pair(s) cross the train/test boundary: "
                f"{len(self.training_copies)} training image(s) copy a test image, {done}"
            )
        if len(self.pairs) > CSV_ROWS:
            said.append(
                f"{len(self.pairs)} pairs counted; splits/near_duplicates.csv keeps the "
                f"{CSV_ROWS} first (those across the train/test boundary first, then the "
                f"closest), the figure {FIGURE_PAIRS}"
            )
        if self.largest_cluster > ONE_CLUSTER_SHARE * len(self.rows):
            said.append(
                f"most of the cohort is one cluster of near-duplicates ({self.largest_cluster} "
                f"of {len(self.rows)} images): are the images placeholders, or is "
                f"the rule ({self.rule.describe()}) too loose?"
            )
        return said

    def table(self, limit: int | None = None) -> pd.DataFrame:
        """The pairs as splits/near_duplicates.csv has them: those crossing the train/test
        boundary first, then the rest, closest first within each; at most `limit` rows
        (default CSV_ROWS)."""
        order = np.lexsort((-self.pairs["similarity"].to_numpy(), ~self.crossing))
        chosen = self.pairs.iloc[order[: limit or CSV_ROWS]]
        table = {}
        for side in ("a", "b"):
            rows = self.rows.iloc[chosen[side]]
            table[f"md5hash_{side}"] = rows["md5hash"].to_numpy()
            table[f"split_{side}"] = rows["split"].to_numpy()
            table[f"label_{side}"] = rows["label"].to_numpy()
            table[f"fst_{side}"] = rows["fitzpatrick_scale"].to_numpy()
        table |= {c: chosen[c].to_numpy() for c in ("hash_distance", "similarity", "cluster")}
        return pd.DataFrame(table)[list(PAIR_COLUMNS)]

    def figure(self, limit: int = FIGURE_PAIRS) -> Figure | None:
        """The closest pairs that cross the train/test boundary (else the closest pairs) side
        by side, to judge the rule by eye; None where there are no pairs."""
        shown = self.table(limit)
        if not len(shown):
            return None
        paths = self.rows.set_index("md5hash")["path"]
        figure = Figure(figsize=(5, 2.5 * len(shown)), layout="constrained")
        axes = figure.subplots(len(shown), 2, squeeze=False)
        for row, pair in zip(axes, shown.itertuples(), strict=True):
            for ax, side in zip(row, ("a", "b"), strict=True):
                md5 = getattr(pair, f"md5hash_{side}")
                ax.imshow(open_small(paths[md5], 256))
                ax.set_title(
                    f"{getattr(pair, f'split_{side}')} · FST {getattr(pair, f'fst_{side}')} · "
                    f"{md5[:8]}\n{getattr(pair, f'label_{side}')}",
                    fontsize=7,
                )
                ax.axis("off")
            row[0].text(
                1.04,
                -0.08,
                f"similarity {pair.similarity:.3f}, pHash distance {pair.hash_distance}",
                transform=row[0].transAxes,
                ha="center",
                fontsize=7,
            )
        figure.suptitle(f"Closest near-duplicate pairs\n{self.rule.describe()}", fontsize=8)
        return figure


def find_near_duplicates(
    rows: pd.DataFrame, hashes: np.ndarray, views: np.ndarray, rule: DuplicateRule
) -> NearDuplicateReport:
    """The near-duplicate pairs of `rows` (md5hash, split, label, fitzpatrick_scale, path),
    given each row's pHash and feature views (see `image_signatures`)."""
    rows = rows.reset_index(drop=True)
    pairs = similar_pairs(hashes, views, rule)
    pairs["cluster"] = clusters(pairs, len(rows))[pairs["a"]]
    order = np.lexsort((pairs["hash_distance"], -pairs["similarity"]))
    return NearDuplicateReport(rule, rows, pairs.iloc[order].reset_index(drop=True))
