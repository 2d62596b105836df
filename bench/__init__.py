"""authsvc's benchmark: ``bench/run`` (or ``python -m bench``) measures, writes RESULTS.md.

See bench/README.md for what each number means and how it is measured.
"""
