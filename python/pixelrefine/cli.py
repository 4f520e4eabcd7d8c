"""The ``pixelrefine`` command: simulate, refine, report, demo; import-dials, export-mtz, merge."""

from __future__ import annotations

import math
import os
import sys
import time

import click
import numpy as np

from .io import COMPRESSION, check_output_path, read_results, read_shoeboxes, write_results, write_shoeboxes
from .refine import refine as refine_set
from .validation import ResultsCheckError
from .report import format_report
from .simulate import simulate as simulate_set

#: The built-in default dataset of ``pixelrefine demo`` (simulated with these settings).
DEMO_SETTINGS = {"n_images": 200, "seed": 0, "max_reflections": 200}


def _parse_options(pairs: tuple[str, ...]) -> dict:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        key, value = pair.split("=", 1)
        for convert in (int, float):
            try:
                options[key] = convert(value)
                break
            except ValueError:
                continue
        else:
            options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def _message(error: BaseException) -> str:
    """An exception's message on one line."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


class _Command(click.Group):
    """The command group, with every error a one-line message (``Error: ...``, exit 1; usage
    errors exit 2): input files' errors name the file, the dataset and the first bad row;
    anything unexpected is an internal error, and Ctrl-C exits 130. ``PIXELREFINE_TRACEBACK=1``
    lets unexpected errors through with their traceback (for debugging)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            ctx.exit(130)
        except ResultsCheckError as error:
            raise click.ClickException(_message(error)) from None
        except (ValueError, TypeError, OSError) as error:  # OSError: FileExistsError, a full disk
            raise click.ClickException(_message(error)) from None
        except MemoryError:
            raise click.ClickException("out of memory") from None
        except Exception as error:
            if os.environ.get("PIXELREFINE_TRACEBACK"):
                raise
            raise click.ClickException(f"internal error ({type(error).__name__}: {_message(error)}); "
                                       f"please report it, with PIXELREFINE_TRACEBACK=1 for the "
                                       f"traceback") from None


@click.group(cls=_Command)
@click.version_option(package_name="pixelrefine")
def main() -> None:
    """Refine serial-crystallography still images reflection by reflection."""


class _Finite(click.ParamType):
    """A finite float within [low, high] (click's FloatRange lets NaN through)."""

    name = "float"

    def __init__(self, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False):
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        below = number <= self.low if self.low_open else number < self.low
        if not math.isfinite(number) or below or number > self.high:
            bound = ">" if self.low_open else ">="
            self.fail(f"{value!r} must be finite and {bound} {self.low:g}", param, ctx)
        return number


POSITIVE = _Finite(0.0, low_open=True)
NON_NEGATIVE = _Finite(0.0)
AT_LEAST_ONE = click.IntRange(min=1)


@main.command()
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--images", "n_images", type=AT_LEAST_ONE, default=20, show_default=True,
              help="Number of stills.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--max-reflections", type=AT_LEAST_ONE, default=None, help="At most this many per image.")
@click.option("--reference-error", type=NON_NEGATIVE, default=0.05, show_default=True,
              help="Relative error of I_ref.")
@click.option("--R0", "R0", type=POSITIVE, default=5e-4, show_default=True,
              help="True partiality width (Å⁻¹).")
@click.option("--compression", type=click.Choice([c for c in COMPRESSION if c]), default="gzip",
              show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def simulate(output, n_images, seed, max_reflections, reference_error, R0, compression, overwrite):
    """Simulate still images with known truth and write a shoebox file (with /truth)."""
    check_output_path(output, overwrite=overwrite)
    shoeboxes = simulate_set(n_images, seed=seed, max_reflections=max_reflections,
                             reference_error=reference_error, R0=R0)
    _write(output, lambda: write_shoeboxes(output, shoeboxes, compression=compression,
                                           overwrite=overwrite))
    click.echo(f"wrote {output}: {shoeboxes.n_images} images, {shoeboxes.n_reflections} reflections")


def _write(path: str, write) -> None:
    """Run ``write``; an OSError (a full disk, a folder removed meanwhile) names the path."""
    try:
        write()
    except FileExistsError:
        raise
    except OSError as error:
        raise click.ClickException(f"{path}: could not be written ({_message(error)})") from None


@main.command()
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--R0", "R0", type=NON_NEGATIVE, default=None,
              help="Partiality width R0 (Å⁻¹) for every crystal, held fixed. Default: refined per "
                   "crystal (two-level fit).")
@click.option("--R0-prior", "R0_prior", type=(_Finite(), POSITIVE), default=None, metavar="MEAN SD",
              help="Gaussian prior on R0 (Å⁻¹) when it is refined.")
@click.option("--objective", type=click.Choice(["factored", "pixel"]), default="factored",
              show_default=True)
@click.option("--profile", type=click.Choice(["auto", "isotropic", "anisotropic", "tail"]),
              default="auto", show_default=True, help="Spot profile model (auto: chosen by the data).")
@click.option("--background", type=click.Choice(["auto", "flat", "plane"]), default="auto",
              show_default=True, help="Background per shoebox (auto: a plane in boxes that allow one).")
@click.option("--error-scale", type=POSITIVE, default=None,
              help="σ inflation k of the error model, held. Default: estimated from the data.")
@click.option("--error-model", type=click.Choice(["gain", "scale"]), default="gain",
              show_default=True,
              help="How k enters the variance: gain (counts k² × photons: k²μ + k⁴σ_read²) or "
                   "scale (every sigma × k). The same without read noise.")
@click.option("--reference-error", type=NON_NEGATIVE, default=None,
              help="Relative error f of I_ref, held. Default: estimated from the data.")
@click.option("--eta", type=NON_NEGATIVE, default=0.0, show_default=True,
              help="Mosaic spread η (rad), given.")
@click.option("--threads", type=AT_LEAST_ONE, default=os.cpu_count() or 1, show_default=True)
@click.option("--sigma-G", "sigma_G", type=POSITIVE, default=None,
              help="Prior on G, relative to the scale found (each crystal's median G after the "
                   "first round): G ~ N(Ĝ, (σ_G Ĝ)²).")
@click.option("--refine-geometry/--no-refine-geometry", default=None,
              help="Refine rotation and detector shift (Term 3); default: on for the factored "
                   "objective.")
@click.option("--option", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any other refinement option (see METHODS.md), repeatable.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (never the input).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def refine(input_file, output, R0, R0_prior, objective, profile, background, error_scale,
           error_model, reference_error, eta, threads, sigma_G, refine_geometry, extra, overwrite,
           progress):
    """Refine every image of INPUT_FILE and write a new results file OUTPUT."""
    check_output_path(output, overwrite=overwrite, inputs=(input_file,))
    options = _parse_options(extra)
    shoeboxes = read_shoeboxes(input_file)
    if sigma_G is not None:
        options["sigma_G"] = sigma_G
    options["background"] = background
    if refine_geometry is not None:
        options["refine_geometry"] = refine_geometry
    start = time.perf_counter()
    try:
        results = refine_set(shoeboxes, R0=R0, R0_prior=R0_prior, objective=objective,
                             profile=profile, error_scale=error_scale, error_model=error_model,
                             reference_error=reference_error, eta=eta, n_threads=threads,
                             progress=sys.stderr.isatty() if progress is None else progress,
                             **options)
    except ResultsCheckError as error:
        raise click.ClickException(f"{input_file}: {_message(error)}") from None
    elapsed = time.perf_counter() - start
    _write(output, lambda: write_results(output, results, overwrite=overwrite))
    click.echo(f"refined {results.n_images} images in {elapsed:.2f} s "
               f"({results.n_images / max(elapsed, 1e-9):.0f} images/s on {threads} thread(s)); "
               f"wrote {output}")


@main.command()
@click.argument("results_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--shoeboxes", "shoebox_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="The input file: adds model-vs-observed shoebox metrics (χ², "
              "PSNR, SSIM) and, when it has /truth, the recovery of the simulated parameters.")
@click.option("--per-image", is_flag=True, help="Also one row per image.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), default=None,
              help="Also write a self-contained HTML page with figures (G, B, R1 per image, R0, "
                   "Wilson plot, χ² per shell, pulls against /truth, CC½ and completeness).")
@click.option("--space-group", default=None, metavar="SG",
              help="For the HTML page's merge, instead of the shoebox file's.")
@click.option("--overwrite", is_flag=True, help="Replace the HTML file if it exists.")
def report(results_file, shoebox_file, per_image, html_file, space_group, overwrite):
    """Print a summary of a results file: parameters and their spread over images."""
    if html_file:
        check_output_path(html_file, overwrite=overwrite, inputs=(results_file, shoebox_file))
    results = read_results(results_file)
    shoeboxes = read_shoeboxes(shoebox_file) if shoebox_file else None
    if shoeboxes is not None:
        rows = (len(results.images["G"]), len(results.reflections["flags"]))
        if rows != (shoeboxes.n_images, shoeboxes.n_reflections):
            raise click.ClickException(
                f"{results_file}: has {rows[0]} images and {rows[1]} reflections, but "
                f"{shoebox_file} has {shoeboxes.n_images} and {shoeboxes.n_reflections}: "
                f"not its results")
    try:
        text = format_report(results, shoeboxes, per_image=per_image)
    except (ValueError, TypeError) as error:  # options of the file the core refuses
        raise click.ClickException(f"{results_file}: cannot be reported: {_message(error)}") from None
    click.echo(text)
    if html_file:
        _write_html(html_file, results, results_file, shoebox_file, space_group)


def _write_html(html_file, results, results_file, shoebox_file, space_group):
    from .io import read_tables
    from .merge import merge_results
    from .report_html import write_html_report

    tables, merged, note = None, None, ""
    source = shoebox_file or results.input_file
    if source and os.path.isfile(source):
        try:
            tables = read_tables(source)
        except ValueError as error:
            note = str(error)
    else:
        note = f"the shoebox file {source!r} is not there (pass --shoeboxes)"
    if tables is not None:
        try:
            merged = merge_results(results, tables, space_group=space_group)
        except ValueError as error:
            note = str(error)
    try:
        write_html_report(html_file, results, tables, merge=merged, merge_note=note,
                          title=f"pixelrefine report: {os.path.basename(results_file)}")
    except OSError as error:
        raise click.ClickException(f"{html_file}: {error}") from None
    click.echo(f"wrote {html_file}")


@main.command("import-dials")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--gain", type=float, default=None, metavar="ADU_PER_PHOTON",
              help="Detector gain for every panel (DIALS often says 1 for data in ADU). Default: "
                   "the panels' gain in the .expt.")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Reference intensities: an MTZ (intensities, or amplitudes squared) or a PDB / "
                   "mmCIF model (|Fcalc|² to the data's resolution).")
@click.option("--reference-column", default=None, help="The MTZ column to take (default: the "
              "first intensity, else the first amplitude).")
@click.option("--space-group", default=None, metavar="SG",
              help="Space group, overriding the .expt's (DIALS 3.12 may store the lattice's "
                   "holohedry, e.g. P 6/m m m for a P 61 2 2 crystal).")
@click.option("--read-noise", type=float, default=0.0, show_default=True,
              help="rms read noise (photons) of every panel.")
@click.option("--bandwidth", type=float, default=0.0, show_default=True,
              help="rms relative bandwidth σλ/λ of the beam (DIALS does not record it).")
@click.option("--parallax", type=click.Choice(["fit", "none"]), default="fit", show_default=True,
              help="fit: move each parallax-corrected panel by the mean absorption depth that "
                   "reproduces DIALS's correction; none: leave it out (the cost is printed).")
@click.option("--compression", type=click.Choice([c for c in COMPRESSION if c]), default="gzip",
              show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT.h5 if it exists.")
def import_dials_command(files, gain, reference, reference_column, space_group, read_noise,
                         bandwidth, parallax, compression, overwrite):
    """Translate DIALS integrated stills into a shoebox file:
    EXPT REFL [EXPT REFL ...] OUT.h5 (.expt experiment lists, .refl tables with shoeboxes)."""
    from .dials import DialsFormatError, import_dials

    if len(files) < 3 or len(files) % 2 == 0:
        raise click.UsageError("give EXPT REFL pairs and then OUT.h5 (an odd number of files, "
                               f"at least 3; got {len(files)})")
    *inputs, output = files
    for path in inputs:
        if not os.path.isfile(path):
            raise click.ClickException(f"{path}: no such file")
    pairs = list(zip(inputs[0::2], inputs[1::2]))
    try:
        summary = import_dials(pairs, output, gain=gain, reference=reference,
                               reference_column=reference_column, space_group=space_group,
                               read_noise=read_noise, bandwidth=bandwidth, parallax=parallax,
                               compression=compression, overwrite=overwrite)
    except (DialsFormatError, ValueError, FileExistsError, OSError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(summary.text())


def _results_and_tables(results_file: str, shoebox_file: str | None):
    """The results and the shoebox file they came from (``input_file``) or the one named."""
    from .io import read_tables

    results = read_results(results_file)
    source = shoebox_file or results.input_file
    if not source:
        raise ValueError(f"{results_file}: does not say which shoebox file it came from; pass "
                         "--shoeboxes")
    if not os.path.isfile(source):
        raise ValueError(f"{results_file}: its shoebox file {source} is not there; pass "
                         "--shoeboxes")
    return results, read_tables(source)


def results_and_output_arguments(command):
    """RESULTS_FILE, OUTPUT, --shoeboxes and --space-group: the arguments of the commands that
    read a results file with its shoebox file's tables and write something new."""
    for decorator in reversed((
            click.argument("results_file", type=click.Path(exists=True, dir_okay=False)),
            click.argument("output", type=click.Path(dir_okay=False)),
            click.option("--shoeboxes", "shoebox_file", type=click.Path(exists=True, dir_okay=False),
                         default=None, help="The shoebox file the results came from (default: "
                         "the one the results file names)."),
            click.option("--space-group", default=None, metavar="SG",
                         help="Instead of the shoebox file's."))):
        command = decorator(command)
    return command


@main.command("export-mtz")
@results_and_output_arguments
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def export_mtz(results_file, output, shoebox_file, space_group, overwrite):
    """Write the unmerged intensities of RESULTS_FILE as an MTZ (as DIALS's export: H K L
    M/ISYM BATCH I SIGI IPR SIGIPR FRACTIONCALC XDET YDET BG, one batch per image)."""
    from .mtz import write_unmerged_mtz

    try:
        check_output_path(output, overwrite=overwrite, inputs=(results_file, shoebox_file))
        results, tables = _results_and_tables(results_file, shoebox_file)
        mtz = write_unmerged_mtz(output, results, tables, space_group=space_group)
    except (ValueError, FileExistsError, OSError, RuntimeError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {output}: {mtz.nreflections} observations, {len(mtz.batches)} batches, "
               f"{mtz.spacegroup.xhm()}, cell {' '.join(f'{v:.3f}' for v in mtz.cell.parameters)}")


@main.command("merge")
@results_and_output_arguments
@click.option("--d-min", type=float, default=None, help="High-resolution limit (Å).")
@click.option("--shells", "n_shells", type=int, default=10, show_default=True,
              help="Resolution shells (equal volume in reciprocal space).")
@click.option("--reject-sigma", type=float, default=6.0, show_default=True,
              help="Reject an observation this many σ from the weighted mean of the others "
                   "(two passes); 'inf' keeps all.")
@click.option("--hkl", "hkl_file", type=click.Path(dir_okay=False), default=None,
              help="Also write CrystFEL's reflection list (.hkl).")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), default=None,
              help="Where the statistics go as JSON (default: OUTPUT with .json).")
@click.option("--overwrite", is_flag=True, help="Replace the outputs if they exist.")
def merge(results_file, output, shoebox_file, space_group, d_min, n_shells, reject_sigma,
          hkl_file, json_file, overwrite):
    """Merge RESULTS_FILE's intensity_scaled per unique reflection into a merged MTZ (IMEAN
    SIGIMEAN N), with CC½, Rsplit, completeness, multiplicity and <I/σ> per shell."""
    import json as json_module

    from .merge import merge_results, write_crystfel_hkl, write_merged_mtz

    json_file = json_file or os.path.splitext(output)[0] + ".json"
    try:
        inputs = (results_file, shoebox_file)
        for path in filter(None, (output, hkl_file, json_file)):
            check_output_path(path, overwrite=overwrite, inputs=inputs)
        results, tables = _results_and_tables(results_file, shoebox_file)
        merged = merge_results(results, tables, space_group=space_group, d_min=d_min,
                               n_shells=n_shells, reject_sigma=reject_sigma)
        write_merged_mtz(output, merged, wavelength=float(np.mean(tables.images["wavelength"])),
                         history=f"pixelrefine merge {os.path.basename(results_file)}")
        if hkl_file:
            write_crystfel_hkl(hkl_file, merged)
        with open(json_file, "w") as handle:
            json_module.dump(merged.as_dict(), handle, indent=1)
    except (ValueError, FileExistsError, OSError, RuntimeError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(merged.table())
    click.echo(f"wrote {output}" + (f", {hkl_file}" if hkl_file else "") + f", {json_file}")


@main.command()
@click.option("--dir", "directory", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo's shoebox and results files go (replaced each run).")
@click.option("--images", "n_images", type=AT_LEAST_ONE, default=DEMO_SETTINGS["n_images"],
              show_default=True)
@click.option("--threads", type=AT_LEAST_ONE, default=os.cpu_count() or 1, show_default=True)
@click.option("--objective", type=click.Choice(["factored", "pixel"]), default="factored",
              show_default=True)
def demo(directory, n_images, threads, objective):
    """Simulate the built-in default dataset, refine it (R0, the error model and the profile
    model from the data; the per-pixel objective is given the true R0), and report against the
    truth."""
    os.makedirs(directory, exist_ok=True)
    shoebox_path = os.path.join(directory, "shoeboxes.h5")
    results_path = os.path.join(directory, f"results-{objective}.h5")
    for path in (shoebox_path, results_path):
        check_output_path(path, overwrite=True)
    settings = {**DEMO_SETTINGS, "n_images": n_images}
    click.echo(f"simulating {n_images} stills (seed {settings['seed']}) → {shoebox_path}")
    shoeboxes = simulate_set(**settings)
    write_shoeboxes(shoebox_path, shoeboxes, overwrite=True)
    shoeboxes = read_shoeboxes(shoebox_path)
    R0 = float(shoeboxes.truth["global"]["R0"][0])
    start = time.perf_counter()
    results = refine_set(shoeboxes, objective=objective, n_threads=threads,
                         progress=sys.stderr.isatty(), **({"R0": R0} if objective == "pixel" else {}))
    elapsed = time.perf_counter() - start
    write_results(results_path, results, overwrite=True)
    click.echo(f"refined {n_images} images ({objective}) in {elapsed:.2f} s on {threads} thread(s) "
               f"→ {results_path}\n")
    click.echo(format_report(read_results(results_path), shoeboxes))


if __name__ == "__main__":  # pragma: no cover
    main()
