"""The FFCV training and evaluation loaders (the optional ``ffcv`` extra; import only when FFCV is installed).

- ``order``: traversal orders (which rows each rank reads, resumable mid-epoch);
- ``decoder``: the compiled JPEG/raw decoder with seeded crops (:mod:`invprop.data.crop`'s box);
- ``loader``: building the ``Loader`` once and running its passes (:func:`~.loader.build_ffcv_train_loader`,
  :func:`~.loader.build_ffcv_eval_loader`);
- ``compat``: every use of FFCV internals, nowhere else.

Writing ``.beton`` files is :mod:`invprop.data.beton` (and its cache :mod:`invprop.data.beton_cache`).
"""
