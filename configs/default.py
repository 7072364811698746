"""Shared defaults for every dataset config: every number of the method lives here (SPEC.md).

Dataset configs (brats.py, msd.py, inhouse.py, demo.py) start from `get_config()` and change
what differs. Ablations are config variants of one model: `apply_method(config, 'baseline2')`,
reached from the command line as `--config=configs/brats.py:baseline2`; `method_config(config,
method)` is the one place a method's own config is made from the main job's.
"""
import ml_collections

METHODS = ('clfc', 'baseline1', 'baseline2', 'unet')


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = 'clfc'          # one of METHODS; set through apply_method().
  c.fold = 0                 # test fold; -1 runs every fold.
  c.methods = ('clfc', 'baseline1', 'baseline2')  # what the main job trains and compares.

  # --- Where the data comes from (SPEC §2, §9) -----------------------------------------------
  c.dataset = d = ml_collections.ConfigDict()
  d.name = 'brats2019'
  d.layout = 'brats'         # brats | msd | generic | nnunet
  d.root = ''                # the user's cohort folder (TFDS manual_dir); '' = not given.
  d.normal_root = ''         # IXI-layout folder of normal T1s; '' = tumor-free-slice fallback.
  d.modalities = ('t1', 't1ce', 't2', 'flair')   # order fixed; channel order of the backbone.
  d.normal_modality = 't1'         # feeds the IntroVAE (t1c for the in-house set).
  d.registration_modality = 't1'   # registered to the MNI152 T1 template.
  d.label_name = 'seg'
  d.allowed_labels = (0, 1, 2, 4)  # BraTS; MSD uses (0, 1, 2, 3).
  d.file_pattern = '{case}_{modality}.nii.gz'   # generic layout: file name per modality.
  d.msd_channels = ('flair', 't1', 't1ce', 't2')  # MSD Task01 4-D channel order, our names.

  # --- Preprocessing (paper §3) ---------------------------------------------------------------
  c.prep = p = ml_collections.ConfigDict()
  p.spacing = 1.0            # mm; the MNI152 grid is resampled to this isotropic spacing.
  p.crop_hw = (192, 160)     # in-plane size (H = anterior-posterior, W = left-right), multiple of 16.
  p.affine_atol = 1e-3       # modalities' affines must agree to this (mm / direction cosines).
  p.num_workers = 2          # processes preparing cases in parallel.
  p.threads_per_worker = 0   # SimpleITK threads per worker; 0 = cpu_count // num_workers.
  p.shard_workers = 0        # processes making the tumor shards' records; 0 = cores - 1.
  p.template_mask_threshold = 0.2   # MNI152 brain mask = GM + WM probability above this.
  p.mask_dilation_mm = 4.0   # template brain mask grown by this before it meets `image > 0`.
  p.scale_percentile = 99.5  # each modality is divided by this brain percentile (store.py).
  # Normal cohort (IXI is not skull-stripped): 'refined' = the template brain refined on the T1
  # (prepare.extract_brain); 'template' = the tumour cohort's rule (dilated template AND signal).
  p.normal_brain_extraction = 'refined'
  p.normal_brain_core_mm = 8.0     # template brain eroded by this: surely brain, the reference.
  p.normal_brain_low = 0.25        # x the core's median T1: darker is bone / air (CSF ~0.35).
  p.normal_brain_high = 1.5        # x the core's median T1: brighter is fat / marrow (WM ~1.2).
  p.normal_brain_opening_mm = 2.0  # opening radius: cuts thin bridges from brain into the scalp.
  p.reg = r = ml_collections.ConfigDict()
  r.histogram_bins = 32      # Mattes mutual information.
  r.sampling_fraction = 0.05
  r.learning_rate = 1.0      # regular-step descent: first step, mm of physical shift.
  r.min_step = 1e-3          # ... stops once the step has shrunk below this.
  r.relaxation = 0.5         # ... and shrinks by this factor when the gradient turns.
  r.iterations = 100
  r.shrink_factors = (4, 2, 1)
  r.smoothing_sigmas = (2.0, 1.0, 0.0)   # in physical units (mm).
  r.init = 'moments'         # centred-transform initialiser: moments | geometry.
  r.spacing = 2.0            # mm; registration runs on both images resampled to this (0 = prep.spacing).
  r.seed = 0                 # metric sampling seed: the same case always gets the same transform.
  p.hist = h = ml_collections.ConfigDict()
  # Nyul & Udupa standard-scale landmarks (percentiles of brain intensities).
  h.percentiles = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
  h.scale = (0.0, 1.0)       # standard-scale range that the 1st..99th percentiles map onto.
  h.brain_threshold = 0.0    # voxels above this (in the registered image) are brain.

  # --- Slices, folds, sampling, augmentation (SPEC §2, §7) -----------------------------------
  c.data = dd = ml_collections.ConfigDict()
  dd.k = 2                   # 2.5D half-width: 2K+1 slices per modality. K=0 is the code's 2D.
  dd.num_folds = 5
  dd.val_fraction = 0.1      # of the training patients, for model selection.
  dd.split_seed = 42
  dd.tumor_fraction = 1.0 / 3.0   # share of each GLOBAL batch drawn from slices with tumor.
  dd.min_brain_fraction = 0.01    # slices with less brain than this are not written to shards.
  dd.tumor_free_margin = 3        # slices: normal-T1 fallback keeps slices this far from tumor.
  # The reader (input_pipeline.py, grain): batches do not depend on these, only speed does.
  # Augmentation (scipy.ndimage) holds the GIL, so threads mostly overlap reading with the
  # step; more throughput (a GPU's demand) takes worker processes, about 35 slices/s each at
  # 192x160, K=2, 4 modalities.
  dd.read_threads = 2        # threads reading, decoding and augmenting batches ...
  dd.read_workers = 0        # ... in each of this many spawned worker processes (0: in process).
  dd.read_prefetch = 4       # batches prepared ahead (per worker).
  dd.read_lut_cache = 512    # per reader: (case, modality) histogram maps kept as float16 LUTs
                             # (256 KiB each; BraTS's 335 x 4 would be 343 MB).
  dd.read_cache_mb = 1024.0  # per reader (and worker process): matched records kept in memory,
                             # first come; the demo's fold (~0.4 MB a record) fits, a BraTS fold
                             # (~1.5 MB a record at 192x160, K=2) a fraction.
  dd.augment = a = ml_collections.ConfigDict()
  a.enabled = True
  a.flip_prob = 0.5          # per in-plane axis.
  a.rotate_prob = 0.2
  a.rotate_deg = 15.0
  a.scale_prob = 0.2
  a.scale_range = (0.85, 1.15)
  a.intensity_prob = 0.15
  a.intensity_scale = 0.1    # multiplicative, 1 ± this.
  a.intensity_shift = 0.1    # additive, ± this (standard-scale units).
  a.gamma_prob = 0.15
  a.gamma_range = (0.7, 1.5)
  a.noise_prob = 0.15
  a.noise_std = 0.05
  # data_prep/augment.py (numpy): the intensity transforms above, and these, fire per modality
  # (the same draw for its 2K+1 slices) and only on each slice's foreground.
  a.per_modality = True      # False: one intensity draw for every modality (the TF pipeline).
  a.bias_prob = 0.3          # smooth multiplicative bias field (cubic polynomial in-plane) ...
  a.bias_strength = 0.3      # ... with max |log field| drawn in [0, this] ...
  a.bias_kind = 'polynomial' # ... a cubic swell, or 'grid': Gaussian values on cells of ...
  a.bias_cell = (0.1, 0.3)   # ... this fraction of the image height, cubic-interpolated
                             # (measured on the demo at strength 0.8, p 0.5: worse everywhere;
                             # README, held-out check).
  a.bias_shared = False      # True: one bias field for every modality of an example (one coil);
                             # measured (grid, 0.8, p 0.5): held-out 41.9% vs 52.7% on its first 8
                             # patients, 21.6% vs 30.7% on 16 of a fresh seed (README).
  a.blur_prob = 0.15         # in-plane Gaussian blur ...
  a.blur_sigma = (0.5, 1.5)  # ... of this many pixels.
  a.lowres_prob = 0.15       # simulated low resolution: in-plane down-sampling ...
  a.lowres_factor = (1.0, 2.0)   # ... by this factor and back.
  a.slab_prob = 0.15         # thick slices: blur across the 2K+1 slices ...
  a.slab_sigma = (0.5, 1.5)  # ... of this many slices.
  a.normal_intensity = False # the pseudo-normal gets only the spatial transforms (augment.py).

  # --- Networks (SPEC §3-§5) ------------------------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.channels = (64, 128, 256, 512)
  m.width = 1.0              # multiplier on channels (and CLFC / SimSiam widths).
  m.n_classes = 2
  m.dtype = 'float32'        # activations: float32 | bfloat16; params and losses stay float32.
  m.upsample = 'phase'       # 'phase' (exact, fast) | 'conv_transpose' (flax reference).
  m.use_normal_net = True
  m.full_skips = False       # True = the `unet` variant (skips from every encoder level).
  m.bn_momentum = 0.9
  m.bn_epsilon = 1e-5

  c.clfc = cl = ml_collections.ConfigDict()
  cl.enabled = True
  cl.stop_grad_before_zeta = True  # paper Fig. 1b; the code has none.
  cl.use_simsiam = True
  cl.proj_dim = 256
  cl.pred_hidden = 128

  c.loss = lo = ml_collections.ConfigDict()
  lo.sim_weight = 1.0        # lambda.
  lo.ce_weight = 0.0         # the code trains -Dice + CE; the paper Dice only.
  lo.dice_smooth = 1e-5
  # β: 0.5 = Dice (the paper); > 0.5 = Tversky, misses cost more. Measured once on the demo
  # (clfc, β = 0.7): held-out Dice 42.8% and sensitivity 32.5% vs 52.7% / 40.5% with the Dice
  # (first 8 held-out patients; 16 of a fresh seed: 26.1% vs 30.7%), so it did not make the
  # model find more of an unfamiliar scan's tumour (README).
  lo.dice_fn_weight = 0.5
  # 'batch': one Dice over the batch (the paper, nnU-Net's batch dice); 'sample': the mean Dice
  # of the slices with tumour (slices without tumour add nothing); 'both': the mean of the two.
  # 'sample' on the demo (clfc, 3 seeds): held-out Dice 41.7 vs 34.1% (16 patients, seed 2027)
  # and 41.1 vs 34.4% (seed 3031), but lower validation Dice and far false positives; the demo
  # trains with 'both' (configs/demo.py, README). The paper's pooled Dice stays the default.
  lo.dice_pooling = 'batch'
  lo.sim_mask_mode = 'normal_only'  # 'normal_only' (SPEC) | 'zero_tumor' (code).

  # --- Segmentation training (SPEC §7) --------------------------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 4           # global batch.
  t.epochs = 300
  t.steps_per_epoch = 250
  t.lr = 1e-2
  t.momentum = 0.95
  t.nesterov = True
  t.weight_decay = 3e-5
  t.poly_power = 0.9
  t.poly_per_epoch = True    # lr steps once per epoch (1 - e/E)^p, like the code; else per step.
  t.clip_norm = 12.0
  t.checkpoint_every_epochs = 1
  t.eval_every_epochs = 1
  t.keep_checkpoints = 2
  t.log_every_steps = 50
  t.val_batch_size = 32
  t.distributed = False      # call jax.distributed.initialize() (multi-host).
  t.coordinator_address = ''  # host:port of process 0; '' = JAX's cluster auto-detection.
  t.num_processes = -1       # -1 = auto-detect.
  t.process_id = -1          # -1 = auto-detect.
  t.donate_state = True      # jitted steps reuse the old state's buffers (halves state memory).
  t.nan_check_every_steps = 1  # fetch the loss this often (one step late) to stop on NaN/Inf.
  t.rng_impl = 'threefry2x32'  # PRNG of the state; 'rbg' compiles init faster on XLA:CPU.
  t.cheap_cpu_compile = False  # XLA:CPU -O0 compiles (tests, smoke runs): faster compile, slower steps.
  # XLA:CPU YNNPACK library fusions in the train and eval steps (XLA's other dot/conv kernels
  # when off): off measured 8% faster for the clfc step (B=4 192x160 K=2, 2 cores: 2.97 ->
  # 2.72 s) and 15% for prediction (32 slices: 2.75 -> 2.34 s).
  t.cpu_ynn_fusions = False

  # --- IntroVAE (SPEC §6) ---------------------------------------------------------------------
  c.introvae = iv = ml_collections.ConfigDict()
  iv.latent = 'vector'       # 'vector' (IntroVAE paper) | 'spatial' (the code's 16x16x512).
  iv.latent_dim = 512
  iv.channels = (32, 64, 128, 256, 512, 512)   # encoder widths per resolution.
  iv.spatial_latent_channels = 512
  iv.alpha = 0.5
  iv.beta = 0.04
  iv.margin = 120.0
  # Adam 2e-4 for both networks (Huang et al. 2018). The paper's 1e-4 / 5e-3 are SGD rates:
  # under Adam the decoder at 5e-3 is unstable (clfc_jax/train/introvae_steps.py, issue 12).
  iv.lr_encoder = 2e-4
  iv.lr_decoder = 2e-4
  iv.adam_b1 = 0.9
  iv.adam_b2 = 0.999
  iv.batch_size = 120
  iv.epochs = 200
  iv.steps_per_epoch = 0     # 0 = one pass over the normal slices.
  iv.dtype = 'float32'
  iv.norm_groups = 8         # GroupNorm groups in the residual blocks (fewer if width is small).
  iv.output_activation = 'linear'  # 'linear' (IntroVAE paper; tanh saturates at lr 5e-3) | 'tanh'.
  iv.hinge_per_sample = True # [m - KL]+ per slice, then batch mean; False: hinge of the batch mean.
  iv.keep_checkpoints = 2     # orbax: the latest epochs kept (resume); the final one is used.
  iv.log_every_steps = 10     # TensorBoard / metrics.jsonl window.
  iv.num_samples = 6          # slices per row of introvae/samples.png (real, reconstructed, sampled).
  iv.recon_batch_size = 32    # slices per jitted pseudo-normal reconstruction call (padded).
  iv.cheap_cpu_compile = False  # XLA:CPU -O0 compiles (tests, smoke runs).
  # The pseudo-normal (clfc_jax.predict.reconstruct_volume): 'reconstruct' = Dec(μ(x)) (SPEC §6)
  # | 'restore' = x̂ near x that the IntroVAE finds likely (introvae_steps.restore; beyond the
  # paper): restore_steps proximal gradient steps of size restore_lr on −ELBO(x̂)/β + λ‖x̂ − x‖₁,
  # λ = restore_weight in [-1,1] units (a pixel leaves the input only where the prior pulls
  # harder). Measured on the demo (experiments/restore_results.md): λ = 0.5 keeps healthy tissue
  # within 2x the noise floor; the full gradient (restore_through_model) was worse and ~7x
  # slower per step, and steps beyond the first (η = 1) changed nothing.
  # 'inpaint' = the input T1, except inside M = dilate(open(G * (x − Dec(μ(x))) < −τ)), where
  # it is filled from the healthy tissue around (clfc_jax.inpaint; beyond the paper).
  iv.inference = 'reconstruct'
  iv.inpaint_threshold = 0.2       # τ, [-1, 1] units: how much darker than Dec(μ) is abnormal.
  iv.inpaint_polarity = -1         # -1 darker (T1 lesions), +1 brighter (T1c), 0 either.
  iv.inpaint_smooth_mm = 2.0       # in-plane Gaussian σ on the residual.
  iv.inpaint_opening_mm = 4.0      # opening radius: drops what is thinner (cortex, sulci).
  iv.inpaint_dilation_mm = 2.0     # the lesion's partial-volume rim.
  iv.inpaint_fill_mm = 3.0         # σ of the first (narrowest) fill pass.
  iv.restore_steps = 1
  iv.restore_lr = 1.0
  iv.restore_weight = 0.5
  iv.restore_through_model = False  # True: differentiate through Dec∘μ and the KL.

  # --- What is segmented and how labels read (data_prep/labels.py, metrics.lesion_wise) -------
  c.task = tk = ml_collections.ConfigDict()
  tk.regions = 'wt'          # 'wt' (the paper) | 'wt_tc_et' (nested WT ⊇ TC ⊇ ET, nnU-Net style).
  tk.label_convention = 'brats2021'   # brats2021 | brats2023 | msd | brats2024_post.
  # BraTS 2023 lesion-wise scoring (BraTS-GLI settings of the challenge's evaluation code).
  tk.lesion = ls = ml_collections.ConfigDict()
  ls.dilation = 3            # GT dilation iterations (voxels) for merging and matching lesions.
  ls.min_volume_mm3 = 50.0   # GT lesions of at most this volume are ignored.
  ls.miss_hd95_mm = 374.0    # HD95 of a missed GT lesion or a false-positive lesion.

  # The pseudo-normal fidelity report (clfc_jax.fidelity; synthetic cohorts know the healthy T1).
  c.fidelity = fi = ml_collections.ConfigDict()
  fi.noise_floor = 0.0248    # healthy-tissue MAE of the noisy vs noise-free healthy T1 of a demo
                             # cohort, [-1, 1] units (experiments/noise_floor.py; re-measure for
                             # another generator or profile).
  fi.healthy_factor = 2.0    # target: healthy-tissue MAE <= this x the noise floor (issue 12)
  fi.tumor_reduction = 0.3   # target: tumour MAE >= 30% below the input's, closer in every case
  fi.ssim_sigma = (0.0, 1.5, 1.5)   # Gaussian SSIM window, voxels (Z, H, W): slice by slice

  c.eval = e = ml_collections.ConfigDict()
  e.batch_size = 32          # slices per jitted prediction call.
  e.tta = False              # mirroring test-time augmentation.
  # Test-time BatchNorm adaptation (predict.case_batch_norm): the weight of each case's own
  # statistics against the training running ones; 0 = the running statistics (the paper).
  e.case_bn_weight = 0.0
  e.case_bn_slices = 64      # at most this many of a case's brain slices give its statistics.
  e.threshold = 0.5          # on the native-space foreground probability (after linear resampling).
  e.wt_label = 1             # label value of whole tumor in the written predictions (BraTS style).

  # clfc_jax/postprocess.py: prediction hygiene after the threshold, in native space.
  c.postprocess = pp = ml_collections.ConfigDict()
  pp.brain_mask = True       # no tumor outside the brain mask.
  pp.min_volume_ml = 0.0     # connected components below this are removed (0 = off); set it
                             # with postprocess.choose_min_volume on validation patients.
  pp.min_volume_candidates = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
  pp.min_gain = 0.0          # mean-Dice gain a candidate needs over no removal (or the default
                             # threshold).
  # The threshold is chosen with the min volume on the validation patients, from these and
  # eval.threshold (postprocess.choose_threshold_and_min_volume); () = always eval.threshold.
  pp.threshold_candidates = (0.2, 0.3, 0.4, 0.5)
  pp.connectivity = 26       # neighbours that join voxels into a component: 6 | 18 | 26.
  pp.keep_largest = True     # the largest component is kept whatever its volume.
  # Candidates with equal validation Dice: 'smaller' (keep the most) or 'larger' (nnU-Net:
  # remove whenever it does not cost validation Dice).
  pp.min_volume_ties = 'smaller'

  c.report = r = ml_collections.ConfigDict()
  r.figures = True           # Figs. 2-4, pseudo-normal examples, training curves (report/figures/).
  r.figure_patients = 3      # test patients shown (best, median, worst clfc Dice).
  r.feature_level = 1        # Fig. 3's decoder level: 0 = 1/8 resolution .. 3 = full.
  r.feature_slices = 4       # axial slices per patient (through the tumor) for Figs. 3 and 4.
  r.feature_points = 1500    # at most this many points per region and feature map in Fig. 3.
  r.dpi = 100
  # Table 1 again per whole-tumour volume bin (native label, ml), cut at these volumes; () = off.
  r.volume_strata_ml = (5.0, 30.0)
  # External native-space predictions scored as extra Table 1 rows ('name=FOLDER[,...]', e.g.
  # 'nnunet=/data/nnunet_preds': <case>.nii.gz from nnUNetv2_predict trained on our splits,
  # data_prep.folds.save_nnunet_splits), their labels in external_convention (data_prep.labels).
  r.external = ''
  r.external_convention = ''   # '' = task.label_convention
  return c


def apply_method(c, method):
  """Turns the shared config into one of the paper's ablations (SPEC §5)."""
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; expected one of {METHODS}')
  c.method = method
  if method == 'baseline1':
    c.model.use_normal_net = False
    c.clfc.enabled = False
    c.clfc.use_simsiam = False
    c.loss.sim_weight = 0.0
  elif method == 'baseline2':
    c.clfc.use_simsiam = False
    c.loss.sim_weight = 0.0
  elif method == 'unet':
    c.model.use_normal_net = False
    c.model.full_skips = True
    c.clfc.enabled = False
    c.clfc.use_simsiam = False
    c.loss.sim_weight = 0.0
  return c


def method_config(config, method=None):
  """A resolved copy of `config` for `method` (default: config.method); `config` is untouched."""
  c = config.copy_and_resolve_references()
  if method is None or method == c.method:
    return c
  return apply_method(c, method)
