"""The stage configs of `swinssl pretrain` and `swinssl finetune`: typed dataclasses, every field documented (the
docstring right after it; tests/test_config_validation.py checks), enumerations as `Literal`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class CropStreamConfig:
    """Where prepared studies come from and how the Ray Data stream cuts crops from them (shared by all runs)."""

    root: str = ""
    """Output folder of `swinssl prepare` (holds manifest.jsonl and shards/)."""
    roi: list[int] = field(default_factory=lambda: [96, 96, 96])
    """Crop size (Z, Y, X) in PET voxels; every side must be divisible by 32."""
    crops_per_study: int = 2
    """Random crops cut from one decoded volume (decoding is the expensive part: reuse it)."""
    batch_size: int = 2
    """Crops per worker per step."""
    shuffle_buffer: int = 8
    """Local shuffle buffer in crops (mixes crops of several studies without a global shuffle)."""
    read_cpus: float = 1.0
    """CPUs per crop task in the Ray Data pipeline."""
    min_crops_per_epoch: int = 256
    """A pass over the data lists each shard often enough to yield at least this many crops: a small cohort would
    otherwise restart the Ray Data pipeline (seconds) every few steps."""


@dataclass
class DataConfig(CropStreamConfig):
    """Which prepared studies feed pretraining (each crop gives two augmented views)."""

    cohort: Literal["unlabeled", "labeled", "all"] = "unlabeled"
    """Cohort of the manifest to pretrain on ('unlabeled', 'labeled' or 'all')."""
    subset: str = "all"
    """'all', or N: the first N studies of the cohort in curation order (450 and 760 are the same code path)."""
    min_foreground: float = 0.05
    """A crop must have at least this share of voxels inside the body (CT channel > body threshold)."""


@dataclass
class ModelConfig:
    """SwinUNETR's Swin encoder (MONAI SwinTransformer) on 2-channel CT/PET input, plus the pretext heads."""

    feature_size: int = 48
    """Embedding width of the first stage; multiple of 12 (bottleneck = 16 x feature_size)."""
    in_channels: int = 2
    """Input modalities stacked as channels (2: CT and PET); the inpainting head reconstructs all of them."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate of the Swin blocks, in [0, 1] (SwinUNETR's dropout_path_rate)."""
    use_checkpoint: bool = False
    """Activation checkpointing in the Swin blocks: less memory, ~30% more compute."""
    contrastive_dim: int = 512
    """Output width of the contrastive projection head (a linear layer on the pooled bottleneck)."""
    voco_dim: int = 2048
    """Hidden and output width of the position-aware contrast projection head (VoCo's: 2048)."""
    use_v2: bool = False
    """SwinUNETR-V2 encoder (Hatamizadeh et al., MICCAI 2023): MONAI's residual conv block (`layers{i}c`) before
    each Swin stage. Recorded in encoder.pt; the fine-tuning's model.use_v2 must match it."""
    fused_attention: bool = True
    """Swin window attention through torch's scaled_dot_product_attention (relative-position bias and shifted-window
    mask as its additive attn_mask), in training and inference (swinssl.models.fused_attention). On by default: equal
    to MONAI's eager attention within float tolerance and faster in the benchmark (benchmarks/attention.py); float32
    training on a CPU, where SDPA is not faster, keeps MONAI's forward. Only the forward changes: weights and
    state-dict keys stay MONAI's, so encoder.pt and checkpoints are unaffected."""


@dataclass
class LossConfig:
    """Weights of the pretext tasks (0 removes that task's head and compute) and their options. One weight per task
    of swinssl.tasks.registry: `w_<task>` for the built-in ones, `extra.w_<task>` for tasks registered outside."""

    w_rotation: float = 1.0
    """Weight of the rotation task (4-way classification of the quarter turns of each view; metric loss_rotation)."""
    w_contrastive: float = 1.0
    """Weight of the contrastive task (NT-Xent between the two views of each crop; metric loss_contrastive). 0 also
    skips the second view, halving the compute."""
    w_inpainting: float = 1.0
    """Weight of the inpainting task (L1 reconstruction of the uncut crop; metric loss_inpainting)."""
    temperature: float = 0.5
    """NT-Xent softmax temperature (> 0; 0.5 in SimCLR's and the SwinUNETR pretraining recipe)."""
    gather_contrastive: bool = True
    """Gather embeddings from all workers so contrastive negatives grow with the cluster."""
    inpaint_holes_only: bool = False
    """L1 over the cut-out holes only (reference: the whole volume)."""
    w_simmim: float = 0.0
    """Weight of masked-patch modelling (SimMIM-style: a learned mask token replaces the patch embeddings of masked
    patches, a decoder predicts their voxels; metric loss_simmim). Its own encoder pass on the unrotated, uncut crop;
    0 skips it and its pass."""
    w_xmodal: float = 0.0
    """Weight of cross-modal reconstruction (one modality of the crop hidden, reconstructed from the other; metric
    loss_xmodal, per direction xmodal/ct_from_pet and xmodal/pet_from_ct). Its own encoder pass; 0 skips it."""
    w_voco: float = 0.0
    """Weight of position-aware volume contrast (VoCo-style: base crops tiling the crop, random crops inside it, their
    embedding similarities supervised by their overlap shares; metric loss_voco, terms voco/pos, voco/neg, voco/reg).
    Its own encoder pass on (pretext.voco_grid product + pretext.voco_crops) smaller crops per crop; 0 skips it."""
    simmim_loss: Literal["l1", "l2"] = "l1"
    """Error on the masked voxels: 'l1' (SimMIM's) or 'l2' (squared, MAE's)."""
    simmim_norm_target: bool = False
    """Standardise the target per mask patch and channel (MAE's norm_pix_loss) instead of raw intensities."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Weights and options of pretext tasks registered from outside swinssl (a plugin, a test): `w_<task>` (default
    0: off) and `<task>_<option>`, e.g. `loss.extra.w_toy=1.0`. Keys no registered task reads are config errors."""


@dataclass
class PretextConfig:
    """Augmentations that make the pretext targets."""

    rotation_dims: list[int] = field(default_factory=lambda: [-2, -1])
    """Plane of the quarter turns: two different dims of the (Z, Y, X) crop (-3..2; default the axial plane). The
    crop sides in that plane must be equal while loss.w_rotation > 0."""
    cutout: Literal["reference", "swinssl_v1"] = "reference"
    """Cutout variant. "reference": the SwinUNETR pretraining's (Project-MONAI/research-contributions,
    SwinUNETR/Pretrain/utils/ops.py): a noise pass and, unless the drawn partner is the view itself (1 in n crops per
    batch), a pass copying another crop of the same view batch, each covering U(0, cutout_max_drop) of the voxels;
    noise N(0, 1) min-max scaled per box. "swinssl_v1": swinssl's first variant, boxes until cutout_max_drop is
    reached, uniform noise, cutout_cross_sample and cutout_max_boxes. Neither fills a view from its own twin."""
    cutout_min_side: float = 0.05
    """Smallest side of a cut-out box, as a fraction of the crop side, in (0, 1] ("reference": sides from
    floor(min_side * S), as the reference draws them)."""
    cutout_max_side: float = 0.25
    """Largest side of a cut-out box, as a fraction of the crop side, in [cutout_min_side, 1] ("reference": sides
    up to floor(max_side * S) - 1, as the reference draws them)."""
    cutout_max_drop: float = 0.3
    """With cutout=reference each pass draws boxes until a U(0, cutout_max_drop) share of the voxels is covered
    (overlaps counted); with swinssl_v1 a view keeps receiving boxes while less than this fraction of its voxels is
    dropped (at most cutout_max_boxes rounds), so the dropped fraction ends below it plus one box."""
    cutout_cross_sample: float = 0.3
    """Read by cutout=swinssl_v1 only: probability that a hole is filled with the same region of another crop
    instead of noise (the reference fills a whole second pass from another crop, with probability (n - 1) / n for
    n crops per batch)."""
    cutout_max_boxes: int = 100
    """Read by cutout=swinssl_v1 only: box draws per sample; ~100 boxes of 5-25 % sides are needed to reach a ~30 %
    drop. The reference variant draws boxes until each pass's share is covered."""
    mask_ratio: float = 0.6
    """Masked-patch modelling (loss.w_simmim): share of the mask patches of each crop that are masked, in (0, 1);
    exactly ceil(mask_ratio x patches per crop) of them, as SimMIM counts."""
    mask_patch: int = 16
    """Side in voxels of a mask patch: an even number (a whole number of the encoder's 2-voxel patches) dividing
    every data.roi side while loss.w_simmim > 0."""
    xmodal_hide_ct: float = 0.5
    """Cross-modal reconstruction (loss.w_xmodal): probability that a crop's CT is hidden (predicted from its PET);
    otherwise its PET is hidden (predicted from CT). In [0, 1]."""
    voco_grid: list[int] = field(default_factory=lambda: [1, 3, 3])
    """Position-aware contrast (loss.w_voco): base crops (Z, Y, X) tiling each crop, >= 2 in all (VoCo tiles 1 x 4 x
    4); every base crop side, data.roi / grid, must be a multiple of 32 (the encoder's). Default: a 96^3 crop into
    96 x 32 x 32-voxel base crops."""
    voco_crops: int = 2
    """Random crops per crop (the size of a base crop, uniformly placed inside the crop), >= 1 (VoCo's default 2)."""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay."""

    lr: float = 4e-4
    """Peak learning rate (reached at the end of warm-up); > 0."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay; >= 0."""
    warmup_steps: int = 500
    """Steps of linear warm-up from lr / warmup_steps to lr; 0 starts at lr. A value >= trainer.steps is allowed
    (short smoke runs): the schedule then never leaves warm-up."""
    min_lr_ratio: float = 0.0
    """The cosine decays to min_lr_ratio x lr at the last step; in [0, 1]."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables."""


@dataclass
class TrainerConfig:
    """Ray Train settings and the loop's schedule."""

    steps: int = 100_000
    """Optimizer steps (not epochs: unlabelled sets of different sizes train for the same number of updates)."""
    num_workers: int = 1
    """Ray Train workers (data-parallel DDP ranks); >= 1."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); False trains on CPU (gloo)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each Train worker reserves; > 0."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each Train worker asks for, e.g. {train_node: 1} to place one worker per node."""
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    """Mixed precision of the forward pass and losses (torch.autocast): 'bf16', 'fp16' (with a GradScaler) or
    'none'. Only on GPU unless amp_on_cpu."""
    amp_on_cpu: bool = False
    """Apply `amp` on CPU too (torch.autocast("cpu")): a test and diagnostic switch that makes the GPU's
    mixed-precision code path (dtype bugs in heads and losses) run on a CPU; bf16 is slower than float32 on most
    CPUs, so not for real training."""
    compile: bool = False
    """torch.compile the model (in place, `nn.Module.compile`, so checkpoints and encoder.pt keep their plain keys
    and resume into an eager or compiled run alike). Off by default: the first step pays the compile, a CPU gains
    nothing (and inductor's CPU code generation failed on the tiny model with torch 2.13); meant for long GPU runs."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """torch.compile backend with `compile`: 'inductor' (PyTorch's default, generates kernels); 'aot_eager' and
    'eager' trace the model but run PyTorch's own kernels, PyTorch's way to tell which stage of a failing compile
    is at fault (and fast to compile in tests)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (the effective batch is batch_size x num_workers x this)."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (and the last step always); >= 1."""
    keep_checkpoints: int = 2
    """Newest checkpoints Ray Train keeps on disk; >= 1."""
    max_failures: int = 3
    """Worker-group restarts Ray Train attempts, each resuming from the last checkpoint."""
    log_every: int = 10
    """Steps between metric reports (MLflow and Ray Train); >= 1."""
    seed: int = 0
    """Seed of model init, crops and augmentations; >= 0. Same seed, same run only with `deterministic`."""
    deterministic: bool = False
    """Bit-reproducible runs on CPU: each worker reads its own seeded crops in its own process instead of the Ray
    Data stream (whose dynamic scheduling varies the crops and their order; see swinssl.data.reproducible), and
    torch's deterministic algorithms are on. Slower input; for checks, small studies and reruns of a result."""


@dataclass
class TrackingConfig:
    """MLflow. An empty tracking_uri means MLFLOW_TRACKING_URI, else sqlite:///<abs output_dir>/../mlflow.db."""

    enabled: bool = True
    """Log params, metrics and artifacts to MLflow; False runs without tracking."""
    tracking_uri: str = ""
    """MLflow tracking URI (e.g. sqlite:///mlflow.db or http://host:5000); '' for the default above."""
    experiment: str = "swinssl-pretrain"
    """MLflow experiment the run is logged under; must not be empty when tracking is enabled."""
    run_name: str = ""
    """MLflow run name; '' uses the config's `name`."""


@dataclass
class ProbeConfig:
    """Downstream probe during pretraining (swinssl.train.probe): every `every` steps rank 0 trains a small head on
    the frozen encoder's multi-scale features, on the labelled training studies of one cross-validation fold, and
    scores Dice on that fold's validation studies (`probe/dice_mean`, `probe/dice/<class>`)."""

    every: int = 0
    """Steps between probes, a multiple of trainer.log_every (the last step is probed too); 0 turns the probe off."""
    folds: int = 5
    """Folds of data.root's labelled studies, split exactly as `swinssl finetune` splits them (patient-grouped,
    lesion-stratified, `train.finetune.make_folds`); keep it and `cv_seed` equal to the fine-tuning's cv.folds and
    cv.seed (a sweep trial sets both from its fine-tuning config)."""
    fold: int = 0
    """Validation fold the probe scores (0..folds-1); the head trains on the studies of the other folds."""
    cv_seed: int = 0
    """Seed of the fold split (the fine-tuning's cv.seed)."""
    steps: int = 200
    """AdamW steps of the probe head at each probe (a fresh head every time)."""
    batch_size: int = 2
    """Training crops per probe-head step."""
    crops_per_study: int = 4
    """Class-balanced training crops (data.roi) cut from each training study, once per run: every probe sees the
    same crops, so probe values differ only by the encoder."""
    hidden: int = 32
    """Width of the head: each encoder scale is projected to this many channels (1x1x1 conv), upsampled and summed."""
    lr: float = 1e-3
    """Learning rate of the probe head (AdamW, constant)."""
    sw_batch_size: int = 4
    """Sliding windows per forward pass when scoring the validation studies."""


@dataclass
class PretrainConfig:
    """`swinssl pretrain`: everything that defines a pretraining run."""

    name: str = "pretrain"
    """Run name: Ray Train's experiment folder under output_dir/ray and the default MLflow run name."""
    output_dir: str = ""
    """Run folder (absolute or relative to the cwd of the driver): config, checkpoints, encoder.pt."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prepared studies and the crop stream."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Swin encoder and its pretext heads."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Pretext loss weights and options."""
    pretext: PretextConfig = field(default_factory=PretextConfig)
    """Augmentations that make the pretext targets."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Ray Train workers and the loop's schedule."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow logging."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """Downstream probe during pretraining (off by default)."""
    export: Literal["last", "best_probe"] = "last"
    """Which weights become encoder.pt: 'last' (the final checkpoint) or 'best_probe' (the weights at the probe step
    with the highest probe/dice_mean, ties to the earlier step; needs probe.every > 0)."""
    init_from: str = ""
    """A checkpoint whose Swin encoder weights initialise the model before step 0 (an encoder.pt, a BTCV swinViT.*
    checkpoint, or the published MONAI self-supervised model_swinvit.pt); the heads stay random. '' starts from
    random weights. A resumed run keeps its checkpoint's weights."""
    init_pet_channel: Literal["zeros", "copy_ct"] = "zeros"
    """When init_from's patch embedding has 1 input channel (CT) and the model more: the PET channel's weights start
    as 'zeros' (the model then computes the 1-channel network's features from the CT at step 0) or 'copy_ct'."""


@dataclass
class FinetuneDataConfig(CropStreamConfig):
    """Labelled studies for fine-tuning (the `labeled` cohort of data.root) and their training crops."""

    crops_per_study: int = 4
    """Random crops cut from one decoded labelled study."""
    class_balanced: bool = True
    """Centre crops on a uniformly chosen class present in the study, so small organs and lesions are seen."""


@dataclass
class SegModelConfig:
    """MONAI SwinUNETR(in_channels=2, out_channels=classes of the label set)."""

    feature_size: int = 48
    """Embedding width of the first Swin stage; multiple of 12 (must match a pretrained encoder's)."""
    in_channels: int = 2
    """Input modalities (CT, PET)."""
    out_channels: int = 0
    """Segmentation classes including background; 0: the number of classes of data.root's label set
    (labels.json, PSMA's 12 without one). The resolved value is written to the run's config.yaml; a non-zero value
    that differs from the label set is a config error."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate of the Swin blocks."""
    use_checkpoint: bool = False
    """Activation checkpointing in the Swin blocks: less memory, ~30% more compute."""
    use_v2: bool = False
    """SwinUNETR-V2 (MONAI `SwinUNETR(use_v2=True)`: a residual conv block before each Swin stage); must match a
    pretrained encoder's (encoder.pt records it), a V1/V2 mismatch is refused before training."""
    fused_attention: bool = True
    """Swin window attention through torch's scaled_dot_product_attention (relative-position bias and shifted-window
    mask as its additive attn_mask), in training, evaluation and `swinssl predict` (swinssl.models.fused_attention).
    On by default: equal to MONAI's eager attention within float tolerance and faster in the benchmark
    (benchmarks/attention.py); float32 training on a CPU, where SDPA is not faster, keeps MONAI's forward. Only the
    forward changes: the state dict is MONAI SwinUNETR's."""


@dataclass
class CVConfig:
    """K-fold cross-validation over the labelled studies (stratified by lesion presence, see eval/folds.py)."""

    folds: int = 5
    """Number of folds k (>= 2, at most the number of labelled studies)."""
    fold: int = -1
    """One fold index (0..folds-1) or -1 for all folds."""
    seed: int = 0
    """Seed of the fold split (folds stay fixed when trainer.seed changes)."""
    train_studies: int = 0
    """Label efficiency: 0 trains each fold on its whole training set; N > 0 on the first whole patients, in a
    seeded order of the fold's training patients (from `seed` and the fold index), holding at least N studies
    (exactly N with one study per patient). Subsets are nested (N=1's inside N=2's inside all); the validation fold
    is unchanged. Must not exceed any run fold's training studies. A sweep axis: finetune.cv.train_studies."""


@dataclass
class EvalConfig:
    """Sliding-window inference over each validation study."""

    sw_batch_size: int = 4
    """Sliding windows per forward pass."""
    overlap: float = 0.25
    """Overlap fraction of neighbouring windows, as in MONAI's sliding_window_inference."""
    mode: Literal["gaussian", "constant"] = "gaussian"
    """Blending of overlapping windows: 'gaussian' down-weights window borders, 'constant' averages evenly."""
    metrics: list[str] = field(default_factory=lambda: ["dice", "lesion"])
    """Metric families computed per validation study (swinssl.eval.families): 'dice', 'lesion' (only when the label
    set has a lesion class), 'hd95' (per-class 95th-percentile Hausdorff distance in mm, MONAI; off by default). The
    fine-tuning driver checks the names against the registry (FAMILIES), so a new family needs no edit here."""
    crop_to_body: bool = True
    """Infer only inside the body's bounding box (the rest of a whole-body FOV is air): same Dice, less time."""
    overlays: int = 3
    """Studies per fold that get a PNG overlay."""
    cpus: float = 1.0
    """CPUs of the Ray task that evaluates one fold (it also takes one GPU when trainer.use_gpu)."""


@dataclass
class FinetuneConfig:
    """`swinssl finetune`: segmentation fine-tuning with cross-validation, from scratch or a pretrained encoder."""

    name: str = "finetune"
    """Run name: Ray Train's experiment folders and the default MLflow run name."""
    output_dir: str = ""
    """Run folder: config, folds, checkpoints, predictions, overlays, metrics.json."""
    encoder: str = ""
    """Path to an `encoder.pt`, an MLflow run id holding one, or '' for training from scratch."""
    freeze_encoder_steps: int = 0
    """Keep the pretrained encoder fixed (lr 0) for this many steps while the decoder adapts."""
    init_pet_channel: Literal["zeros", "copy_ct"] = "zeros"
    """When the encoder's patch embedding has 1 input channel (CT, e.g. the published MONAI self-supervised
    model_swinvit.pt) and the model more: the PET channel's weights start as 'zeros' (the net then computes the
    1-channel network's features from the CT) or 'copy_ct'."""
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    """Labelled studies and their training crops."""
    model: SegModelConfig = field(default_factory=SegModelConfig)
    """The segmentation network."""
    cv: CVConfig = field(default_factory=CVConfig)
    """Cross-validation folds."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=1e-5, warmup_steps=100))
    """Optimizer and learning-rate schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Ray Train workers and the loop's schedule."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Inference and metrics on each fold's validation studies."""
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="swinssl-finetune"))
    """MLflow logging."""
