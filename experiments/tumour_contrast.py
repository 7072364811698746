"""How visible a synthetic cohort's edema is: its contrast against the tissue around the tumour.

`python experiments/tumour_contrast.py COHORT_DIR [COHORT_DIR ...]` reads every patient of a
data_prep.synthetic cohort (COHORT_DIR/BraTS/*/*) in its native space and prints, per modality,
the edema's median minus the median of a ring 2-6 voxels outside the whole tumour, in standard
deviations of that ring, and the share of edema voxels below the ring's 90th percentile (an
edema voxel no brighter than the brightest tenth of the tissue around it). Used for the README's
held-out paragraph: why the `heldout` profile's edema is hard to find.
"""
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

MODALITIES = ('flair', 't2', 't1ce', 't1')
EDEMA = 2


def case_contrast(folder: Path) -> dict:
  cid = folder.name
  images = {m: np.asanyarray(nib.load(str(folder / f'{cid}_{m}.nii.gz')).dataobj).astype(float)
            for m in MODALITIES}
  label = np.asanyarray(nib.load(str(folder / f'{cid}_seg.nii.gz')).dataobj)
  tumour, edema = label > 0, label == EDEMA
  ring = (ndi.binary_dilation(tumour, iterations=6) & ~ndi.binary_dilation(tumour, iterations=2)
          & (images['t1'] > 0))
  out = {'case': cid, 'edema_voxels': int(edema.sum())}
  for m, v in images.items():
    around = v[ring]
    out[m] = (float((np.median(v[edema]) - np.median(around)) / around.std()),
              float((v[edema] < np.percentile(around, 90)).mean()))
  return out


def main(dirs):
  for d in dirs:
    rows = [case_contrast(f) for f in sorted(Path(d).glob('BraTS/*/*')) if f.is_dir()]
    print(f'{d}: {len(rows)} patients')
    for r in rows:
      print(f"  {r['case']} edema {r['edema_voxels']:6d} voxels  " + '  '.join(
          f'{m} {r[m][0]:+.2f} sd, {100 * r[m][1]:3.0f}% < ring p90' for m in MODALITIES))
    for m in MODALITIES:
      c = np.array([r[m][0] for r in rows]); f = np.array([r[m][1] for r in rows])
      print(f'  {m}: contrast median {np.median(c):+.2f} sd (range {c.min():+.2f} to '
            f'{c.max():+.2f}); edema below the ring p90: median {100 * np.median(f):.0f}%')


if __name__ == '__main__':
  main(sys.argv[1:])
