"""An in-house cohort: one folder per patient with t1c, b0, md, fa (and seg); T1c feeds the IntroVAE."""
from configs import default


def get_config(method='clfc'):
  c = default.get_config()
  c.dataset.name = 'inhouse'
  c.dataset.layout = 'generic'
  c.dataset.modalities = ('t1c', 'b0', 'md', 'fa')
  c.dataset.normal_modality = 't1c'
  c.dataset.registration_modality = 't1c'
  c.dataset.file_pattern = '{case}_{modality}.nii.gz'
  return default.apply_method(c, method or 'clfc')
