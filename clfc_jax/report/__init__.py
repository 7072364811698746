"""The report stage: tables (Table 1, Wilcoxon), gather (workdir -> arrays) and page
(index.md / index.html with the figures of clfc_jax.plots)."""
