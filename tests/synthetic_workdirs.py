"""A WORKDIR of prepared synthetic tumour cases with fold 0's histogram references, shared by the
evaluation, report and region tests (which then add checkpoints and pseudo-normals)."""
from clfc_jax.workdir import Workdir
from data_prep import folds, normalize, prepare, readers, store, synthetic


def prepared_workdir(root, config, num_cases: int, seed: int, **generate_kwargs):
  """(Workdir root/'work', fold 0's split, its references): `num_cases` synthetic cases generated under
  root/'syn', prepared, and fold 0's references fitted on its training patients."""
  wd = Workdir(root / 'work')
  synthetic.generate_cohort(root / 'syn', num_cases, 0, seed=seed, spacing=2.0, progress=False,
                            **generate_kwargs)
  for case in readers.find_cases(config, root / 'syn' / 'BraTS'):
    prepare.prepare_case(case, config, wd.prep_cases)
  split = folds.prepared_split(wd.prep, config, 0)
  train_ids = split['train'] + split['val']
  refs = normalize.fit_references((store.load_prepared(wd.prep_cases, i) for i in train_ids),
                                  config.dataset.modalities, config)
  normalize.save_references(refs, wd.hist_refs(0), fitted_on=train_ids)
  return wd, split, refs
