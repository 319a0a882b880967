"""The 12 segmentation classes of the PSMA PET/CT study (REFERENCE.md §1), index = label value."""

CLASSES: tuple[str, ...] = (
    "background",
    "lacrimal_glands",
    "parotid_glands",
    "submandibular_glands",
    "tubarial_glands",
    "sublingual_gland",
    "kidneys",
    "spleen",
    "liver",
    "small_intestine",
    "bladder",
    "lesion",
)
NUM_CLASSES: int = len(CLASSES)
LESION: int = CLASSES.index("lesion")
