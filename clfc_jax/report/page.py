"""The report stage (SPEC §8): Table 1 with Wilcoxon p-values, per-fold means, figures, an
index page.

Reads WORKDIR/eval/<method>/fold<k>/per_patient.csv for every method and fold, writes
WORKDIR/report/table1.{md,csv} (report/tables.py), WORKDIR/report/index.md and index.html
(the same page with its figures inlined, for a browser). The index is a list of sections, each
a function `(context) -> markdown`; figure sections gather their arrays (report/gather.py) and
save PNGs under WORKDIR/report/figures/ (clfc_jax/plots.py). A figure whose inputs are missing (a method not trained, no
pseudo-normals) is skipped with a one-line note, so a partial workdir still gets its report.
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import html
from pathlib import Path
import re
import shutil
from typing import Callable, Optional, Sequence

from absl import logging

from clfc_jax import plots
from clfc_jax import run_log
from clfc_jax.report import gather
from clfc_jax.report import tables
from clfc_jax.workdir import Workdir
from configs import default
from data_prep import labels
from data_prep import optional
from data_prep import store
from data_prep.case import CaseError

REFERENCE_METHOD = tables.REFERENCE_METHOD
_name = tables.method_name

# config.report of configs/default.py, for configs saved before it existed.
_DEFAULT_REPORT = {'figures': True, 'figure_patients': 3, 'feature_level': 1,
                   'feature_slices': 4, 'feature_points': 1500, 'dpi': 100}
@dataclasses.dataclass
class ReportContext:
  """What every section may use."""
  config: object
  methods: Sequence[str]
  folds: Sequence[int]
  per_patient: dict          # stats' layout, methods in `methods` order
  report_dir: Path
  paths: dict                # name -> written file (sections add theirs)
  missing: Sequence[str]     # per-patient CSVs that were not there (allow_missing=True)
  workdir: Optional[Path] = None   # None: no figure sections (tables only)
  # task.regions 'wt_tc_et': {region: per_patient} of every region ('wt' is `per_patient`).
  regions: dict = dataclasses.field(default_factory=dict)
  cache: dict = dataclasses.field(default_factory=dict)   # inputs shared by figure sections
  # ({patient: native whole-tumour ml}, [patients left out]) for the table by volume.
  volumes: Optional[tuple] = None


# --- sections of index.md ----------------------------------------------------------------------
def section_table1(ctx: ReportContext) -> str:
  """Table 1; a region run gets one block per region (table1_<region>.{md,csv}), table1.md
  holds them all and table1.csv their rows with a `region` column."""
  if not ctx.regions:
    return tables.table1(ctx.per_patient, ctx.paths['table1_md'], ctx.paths['table1_csv'])
  blocks, rows = [], []
  for region, per_patient in ctx.regions.items():
    md, csv_path = (ctx.report_dir / f'table1_{region}.{ext}' for ext in ('md', 'csv'))
    blocks.append(tables.table1(per_patient, md, csv_path, region=region))
    ctx.paths[f'table1_{region}_md'], ctx.paths[f'table1_{region}_csv'] = md, csv_path
    with open(csv_path, newline='') as f:
      rows += [dict(region=region, **row) for row in csv.DictReader(f)]
  store.write_text(ctx.paths['table1_md'], '\n'.join(blocks))
  fields = list(dict.fromkeys(k for row in rows for k in row))
  with open(ctx.paths['table1_csv'], 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
  return '\n'.join(blocks)


def section_fold_means(ctx: ReportContext) -> str:
  return tables.fold_means_table(ctx.per_patient, ctx.folds)


def section_volume_strata(ctx: ReportContext) -> str:
  edges = _report_config(ctx).get('volume_strata_ml', ())
  if not edges or not ctx.volumes or not ctx.volumes[0]:
    return ''
  volumes, left_out = ctx.volumes
  return tables.volume_table(ctx.per_patient, volumes, edges, left_out)


def section_paper(ctx: ReportContext) -> str:
  del ctx
  return tables.paper_table()


def section_missing(ctx: ReportContext) -> str:
  if not ctx.missing:
    return ''
  return ('## Missing results\n\nThis report is partial; no per-patient CSV at:\n\n'
          + '\n'.join(f'- `{p}`' for p in ctx.missing) + '\n')


# --- figure sections ---------------------------------------------------------------------------
FIGURES_DIR = 'figures'


class SkipFigure(Exception):
  """A figure's inputs are not in the workdir; the message says which."""


def _figure_section(ctx: ReportContext, title: str, name: str, make, caption: str) -> str:
  """'## title', the PNG `make(path)` draws, its caption; a note instead when it cannot be made.

  `make` may return extra markdown (notes on panels left out). Any failure is logged with its
  traceback and noted on the page: one figure must not cost the whole report.
  """
  if ctx.workdir is None:
    return ''
  path = ctx.report_dir / FIGURES_DIR / f'{name}.png'
  try:
    extra = make(path) or ''
  except SkipFigure as e:
    return f'## {title}\n\n*Figure skipped: {e}.*\n'
  except (FileNotFoundError, CaseError) as e:   # an input not in the workdir: no traceback
    logging.warning('report: figure %s skipped: %s', name, e)
    return f'## {title}\n\n*Figure skipped: {e}.*\n'
  except Exception as e:  # pylint: disable=broad-except
    logging.exception('report: figure %s failed', name)
    return f'## {title}\n\n*Figure skipped: {type(e).__name__}: {e}.*\n'
  ctx.paths[f'figure_{name}'] = path
  return (f'## {title}\n\n![{title}]({FIGURES_DIR}/{path.name})\n\n{caption}\n'
          + (f'\n{extra}\n' if extra else ''))


def _report_config(ctx):
  return ctx.config.get('report', None) or _DEFAULT_REPORT


def _dpi(ctx) -> int:
  return int(_report_config(ctx).get('dpi', 100))


def _shown_patients(ctx) -> list:
  """(patient, fold) of the figures: best, median, worst Dice of CLFC (or the first method)."""
  if 'patients' not in ctx.cache:
    if not ctx.per_patient:
      raise SkipFigure('no per-patient results')
    method = REFERENCE_METHOD if REFERENCE_METHOD in ctx.per_patient else next(
        iter(ctx.per_patient))
    ctx.cache['patients'] = gather.pick_patients(
        ctx.per_patient[method], int(_report_config(ctx).get('figure_patients', 3)))
    ctx.cache['patients_by'] = method
  return ctx.cache['patients']


def _dice_of(ctx, patient) -> dict:
  out = {}
  for method, results in ctx.per_patient.items():
    for p, d in zip(results['patient'], results['dice']):
      if str(p) == patient:
        out[method] = float(d)
  return out


def section_segmentation_examples(ctx: ReportContext) -> str:
  def make(path):
    wd = Workdir(ctx.workdir)
    rows = []
    shown = _shown_patients(ctx)
    ranks = ('best', 'median', 'worst') if len(shown) == 3 else [''] * len(shown)
    for rank, (patient, fold) in zip(ranks, shown):
      meta = store.load_prepared_meta(wd.prep_cases, patient)
      preds = {m: wd.eval_dir(m, fold) / 'predictions' / f'{patient}_seg.nii.gz'
               for m in ctx.methods}
      title = f'{patient}' + (f' ({rank})' if rank else '')
      rows.append(gather.native_axial_row(meta, preds, _dice_of(ctx, patient), title,
                                          ctx.config.task.label_convention))
    plots.plot_segmentation_overlays(rows, ctx.methods, path, _dpi(ctx))
  by = _name(ctx.cache.get('patients_by', REFERENCE_METHOD))
  return _figure_section(
      ctx, 'Fig. 2: segmentation examples (native space)', 'fig2_segmentation', make,
      'Test patients with the best, median and worst Dice of '
      f'{by}, on the axial slice with the largest tumor cross-section, zoomed on the tumor '
      '(FLAIR; radiological view: anterior up, patient\'s right on the left). Yellow: ground '
      'truth; cyan: each method\'s prediction; look for tumor parts one method misses or '
      'normal tissue it includes. Dice in the titles is patient-wise (3-D).')


def _clfc_methods(ctx) -> list:
  """Our methods with a CLFC module (external rows, e.g. nnU-Net, have no networks here)."""
  return [m for m in ctx.methods
          if m in default.METHODS and default.method_config(ctx.config, m).clfc.enabled]


def _network_outputs(ctx, method):
  """gather.network_outputs of `method` on the shown patients; cached (Figs. 3 and 4)."""
  key = ('net', method)
  if key not in ctx.cache:
    try:
      ctx.cache[key] = gather.network_outputs(
          ctx.config, ctx.workdir, method, _shown_patients(ctx),
          int(_report_config(ctx).get('feature_slices', 4)))
    except (FileNotFoundError, ValueError) as e:   # CaseError is a ValueError
      ctx.cache[key] = e
  return ctx.cache[key]


def _clfc_outputs(ctx):
  """({method: network outputs} of the CLFC methods, markdown notes on the methods left out);
  SkipFigure when there is none to show."""
  methods = _clfc_methods(ctx)
  if not methods:
    raise SkipFigure('no method with a CLFC module among ' + ', '.join(ctx.methods))
  found, notes = {}, []
  for m in methods:
    out = _network_outputs(ctx, m)
    if isinstance(out, Exception):
      notes.append(f'*{_name(m)} left out: {out}.*')
    else:
      found[m] = out
  notes = '\n'.join(notes)
  if not found:
    raise SkipFigure(notes.replace('*', '').replace('\n', ' ').rstrip('.'))
  return found, notes


def section_feature_pca(ctx: ReportContext) -> str:
  level = int(_report_config(ctx).get('feature_level', 1))
  level_name = plots.LEVEL_NAMES[level] if 0 <= level < len(plots.LEVEL_NAMES) else level

  def make(path):
    found, notes = _clfc_outputs(ctx)
    points = int(_report_config(ctx).get('feature_points', 1500))
    panels = {}
    for m, out in found.items():
      lv = out['levels'][level]
      panels[m] = plots.feature_groups(lv['zeta'], lv['g'], out['label'], out['brain'], points)
      shape = lv['zeta'].shape
    subtitle = (f'Decoder level {level_name} resolution ({shape[1]}×{shape[2]} px, '
                f'{shape[3]} channels); {shape[0]} slices of {len(set(out["case"]))} test patients')
    plots.plot_feature_pca(panels, path, subtitle, _dpi(ctx))
    return notes
  return _figure_section(
      ctx, 'Fig. 3: CLFC feature vectors (PCA)', 'fig3_feature_pca', make,
      f'Pixel vectors of ζ(F_T) (tumor branch) and g(F_R) (pseudo-normal branch) at the '
      f'{level_name}-resolution decoder level, from the shown patients\' slices through the '
      'tumor, split into tumor and normal brain (outside the head left out), projected on the '
      'first two principal components of each model. With SimSiam (CLFC) the normal ζ and g '
      'clouds should overlap and lie apart from the tumor ζ cloud; Baseline-2 is the same '
      'model trained without SimSiam. The titles give the mean per-pixel cosine of ζ and g.')


def section_attention(ctx: ReportContext) -> str:
  def make(path):
    found, notes = _clfc_outputs(ctx)
    patients = _shown_patients(ctx)
    patient = patients[len(patients) // 2][0]
    rows = [gather.attention_row(m, out, out['case'].index(patient))
            for m, out in found.items()]
    first = next(iter(found.values()))
    subtitle = f'{patient}, MNI axial slice {first["slice"][first["case"].index(patient)]}'
    plots.plot_attention_maps(rows, path, subtitle, _dpi(ctx))
    return notes
  return _figure_section(
      ctx, 'Fig. 4: attention maps A_l', 'fig4_attention', make,
      'The median patient\'s MNI-space slice with the largest tumor area: the input (FLAIR) '
      'with the ground truth, the attention A_l of every decoder level from 1/8 to full '
      'resolution (one 0-1 scale, ground truth dashed; under each map its mean inside the '
      'tumor and in the rest of the brain) and the prediction (cyan). A map that singles out '
      'the tumor shows the comparison with the pseudo-normal at work.')


def section_pseudo_normals(ctx: ReportContext) -> str:
  def make(path):
    wd = Workdir(ctx.workdir)
    shown = [(p, k) for p, k in _shown_patients(ctx)
             if wd.pseudo_normal_file(p, wd.introvae_key(k)).exists()]
    if not shown:
      raise SkipFigure(f'no pseudo-normal T1 of the shown patients in {wd.pseudo_normal}')
    rows = [gather.pseudo_normal_row(ctx.config, ctx.workdir, p, k) for p, k in shown]
    plots.plot_pseudo_normals(rows, path, _dpi(ctx))
  return _figure_section(
      ctx, 'Pseudo-normal T1 (IntroVAE)', 'pseudo_normals', make,
      'Each shown patient\'s tumor T1, its pseudo-normal reconstruction and, for synthetic '
      'cases, the same subject\'s healthy T1, all scaled as the IntroVAE saw them (MNI space, '
      'tumor slice, ground truth dashed). |pseudo − tumor T1| should light up the tumor only; '
      '|pseudo − healthy| is the reconstruction error.')


def section_training_curves(ctx: ReportContext) -> str:
  def make(path):
    wd = Workdir(ctx.workdir)
    runs = {}
    for m in ctx.methods:
      for k in ctx.folds:
        log = wd.run_dir(m, k) / run_log.METRICS_NAME
        if log.exists():
          records = run_log.read_events(log)
          if any(r.get('event') == 'train' for r in records):
            runs[(m, k)] = records
    if not runs:
      raise SkipFigure(f'no training log under {wd.runs}')
    plots.plot_training_curves(runs, path, _dpi(ctx))
  return _figure_section(
      ctx, 'Training curves', 'training_curves', make,
      'Training loss terms (logged means over each window of steps) and the validation '
      'patients\' mean Dice per epoch, per method (colour) and fold (line style); the best '
      'validation epoch is the checkpoint that was evaluated.')


def section_introvae(ctx: ReportContext) -> str:
  def make(path):
    wd = Workdir(ctx.workdir)
    iv_dir = wd.introvae_dir(wd.introvae_keys(ctx.config)[0])   # the first fold's, without IXI
    log = iv_dir / run_log.METRICS_NAME
    records = run_log.read_events(log) if log.exists() else []
    if not any(r.get('event') == 'train' for r in records):
      raise SkipFigure(f'no IntroVAE training log at {log}')
    plots.plot_introvae_curves(records, path, ctx.config.introvae.get('margin', None),
                                 _dpi(ctx))
    samples = iv_dir / 'samples.png'
    if samples.exists():
      copy = path.parent / 'introvae_samples.png'
      shutil.copyfile(samples, copy)
      ctx.paths['figure_introvae_samples'] = copy
      return (f'![IntroVAE samples]({FIGURES_DIR}/{copy.name})\n\nIntroVAE samples after '
              'training, as the introvae stage drew them (introvae/samples.png, anterior up): '
              'rows are real '
              'normal slices, their reconstructions and images decoded from random latents.')
    return ''
  return _figure_section(
      ctx, 'IntroVAE training', 'introvae_curves', make,
      'The encoder and decoder objectives, the reconstruction error and the KL terms of real, '
      'reconstructed and sampled images per epoch. The adversarial game is working when the '
      'KL of real images stays below the margin and those of reconstructed/sampled images '
      'rise towards it, while the MSE falls.')


SECTIONS: list[Callable[[ReportContext], str]] = [
    section_missing, section_table1, section_fold_means, section_volume_strata, section_paper,
    section_segmentation_examples, section_feature_pca, section_attention,
    section_pseudo_normals, section_training_curves, section_introvae]


# --- index.html --------------------------------------------------------------------------------
_HTML_STYLE = ('body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;'
               'line-height:1.45}table{border-collapse:collapse;margin:1em 0}'
               'th,td{border:1px solid #bbb;padding:.3em .6em;text-align:right}'
               'th:first-child,td:first-child{text-align:left}img{max-width:100%;'
               'border:1px solid #ddd}code{background:#f4f4f4}')


def write_html(markdown_text: str, path, base_dir) -> Path:
  """index.md as one self-contained HTML page: markdown-it-py (GFM tables on), every
  `figures/*.png` inlined as a data URI so the file can be opened or mailed alone."""
  body = optional.markdown_it()('commonmark', {'html': False}).enable('table').render(markdown_text)

  def inline(match):
    src = Path(base_dir) / html.unescape(match.group(1))
    if not src.is_file():
      return match.group(0)
    data = base64.b64encode(src.read_bytes()).decode('ascii')
    return f'src="data:image/png;base64,{data}"'

  body = re.sub(r'src="([^"]+\.png)"', inline, body)
  title_match = re.search(r'^# (.+)$', markdown_text, re.M)
  title = html.escape(title_match.group(1) if title_match else 'CLFC report')
  return store.write_text(path, f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
                          f'<style>{_HTML_STYLE}</style></head>\n<body>\n{body}</body></html>\n')


def write_report(config, workdir, methods: Optional[Sequence[str]] = None,
                 folds: Optional[Sequence[int]] = None, *, allow_missing: bool = False,
                 with_figures: Optional[bool] = None) -> dict:
  """Writes WORKDIR/report/{table1.md, table1.csv, index.md, index.html, figures/*.png};
  returns {name: path} ('figure_<name>' for each figure made).

  `methods` / `folds` default to config.methods and every fold. Raises FileNotFoundError
  naming each missing method/fold unless `allow_missing` (then the index lists them).
  `with_figures` defaults to config.report.figures.
  """
  methods = list(methods if methods is not None else config.methods)
  folds = [int(k) for k in (folds if folds is not None else range(config.data.num_folds))]
  per_patient, missing = gather.load_results(workdir, methods, folds,
                                             allow_missing=allow_missing)
  region_names = labels.region_names(config)
  regions = {}
  if len(region_names) > 1:
    regions['wt'] = {m: per_patient[m] for m in methods if m in per_patient}
    for region in region_names[1:]:
      found, lacking = gather.load_results(workdir, methods, folds, allow_missing=allow_missing,
                                           region=region)
      regions[region] = {m: found[m] for m in methods if m in found}
      missing = list(missing) + lacking
  report_dir = Workdir(workdir).report
  report_dir.mkdir(parents=True, exist_ok=True)
  report_config = config.get('report', None) or _DEFAULT_REPORT
  if with_figures is None:
    with_figures = bool(report_config.get('figures', True))
  volumes = None
  if report_config.get('volume_strata_ml', ()):
    patients = sorted({str(p) for r in per_patient.values() for p in r['patient']})
    volumes = gather.truth_volumes_ml(workdir, patients, config.task.label_convention)
  ctx = ReportContext(config=config, methods=methods, folds=folds,
                      per_patient={m: per_patient[m] for m in methods if m in per_patient},
                      report_dir=report_dir, missing=missing,
                      paths={'table1_md': report_dir / 'table1.md',
                             'table1_csv': report_dir / 'table1.csv'},
                      workdir=Path(workdir) if with_figures else None, regions=regions,
                      volumes=volumes)
  scored = ('whole tumor' if not regions else
            ', '.join(r.upper() for r in region_names) + ' (nested regions)')
  header = (f'# CLFC report: {config.dataset.name}\n\n'
            f'Methods: {", ".join(_name(m) for m in methods)}; test folds: '
            f'{", ".join(map(str, folds))} of {config.data.num_folds}; {scored} scored in '
            'each patient\'s native space.\n')
  body = [header] + [text for text in (section(ctx) for section in SECTIONS) if text]
  index = report_dir / 'index.md'
  store.write_text(index, '\n'.join(body))
  paths = {k: Path(v) for k, v in ctx.paths.items() if isinstance(v, (str, Path))}
  paths['index'] = index
  paths['index_html'] = write_html(index.read_text(), report_dir / 'index.html', report_dir)
  return paths
