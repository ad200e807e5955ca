"""DES validation of a trained deblender: im3shape shapes and DES cutouts (SPEC 7).

The fifth layer: it imports every layer below (core, simulation, training, evaluation) and only
its command-line modules (``fetch``, ``standin``, ``validate``) are entry points.

Commands::

    python -m des_validation.fetch    --out DIR [--limit N]        # needs internet (Data Lab)
    python -m des_validation.standin  --out DIR [--n N]            # DES-like stand-in, offline
    python -m des_validation.validate --run R --catalog CAT --cutouts DIR_OR_NPZ [--out DIR]

Modules, one job each:

- :mod:`des_validation.catalog`: read the im3shape catalog (FITS or CSV, case-insensitive
  columns) and apply the cuts, counting what each removes;
- :mod:`des_validation.cutouts`: read cutouts (multi-extension FITS, one FITS per band, or a
  stacked ``.npz``), never raising for one bad object;
- :mod:`des_validation.frames`: ellipticities between the catalog's sky frame and the cutout's
  pixel frame through the WCS (north up, east left: e2 -> -e2), shear <-> distortion;
- :mod:`des_validation.prepare`: resample to the model's pixels and crop, map DES g r i z Y onto
  the model's bands, fill u (``zeros``, ``g_copy``, ``g_extrapolate``), normalisation constants;
- :mod:`des_validation.standin_cutouts`: simulated DES-like cutouts + im3shape-like catalog with
  truth (command line: :mod:`des_validation.standin`);
- :mod:`des_validation.validation`: the validation and its report (command line:
  :mod:`des_validation.validate`);
- :mod:`des_validation.datalab`: the Data Lab query and cutout download (command line:
  :mod:`des_validation.fetch`).

Cutout formats (one object = one ``coadd_objects_id``; bands g r i z Y):

1. ``DIR/<id>.fits``: one multi-extension FITS per object, one image HDU per band named by its
   ``EXTNAME`` (or else the first word of its ``FILTER`` keyword), case-insensitive.
2. ``DIR/<id>_<band>.fits``: one FITS file per band (e.g. ``123_g.fits`` ... ``123_Y.fits``).
3. ``FILE.npz``: ``images`` (N, 5, H, W), ``ids`` (N,), ``bands`` (5,), ``pixel_scale``
   (arcsec), optional ``jacobian`` (N, 2, 2) local WCS Jacobians and ``centers`` (N, 2).

FITS pixel values and WCS are read with astropy; ``.fits.gz`` / ``.fits.fz`` work too.
"""
