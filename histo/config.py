"""Settings of an analysis: one frozen dataclass, with defaults and their units.

The CLI and the napari widgets build an `AnalysisConfig` and pass it down; no default is written
anywhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

METHODS = ("classical", "unet")
#: What may run the network on the CPU (`models.runtime`).
RUNTIMES = ("auto", "torch", "int8")
#: Arithmetic of the network on a GPU (`AnalysisConfig.precision`).
PRECISIONS = ("auto", "float32")
#: What a nucleus's Ki67 is (`AnalysisConfig.ki67_measure`): its mean, or the 90th
#: percentile of its pixels; the quantile each stands for.
KI67_QUANTILES = {"mean": None, "p90": 0.9}
KI67_MEASURES = tuple(KI67_QUANTILES)


@dataclass(frozen=True)
class AnalysisConfig:
    """Everything that changes what an analysis finds.

    Attributes
    ----------
    method : str
        Cell detector: ``"classical"`` (nuclei from DAPI, HER2 around them) or ``"unet"``
        (the segmentation network of ``models``).
    model_path : str, optional
        Weights of the network (default: the shipped model).
    device : str
        Where the network runs: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    batch_size : int
        Network tiles per forward pass.
    screen : bool
        Run the network only around candidate cancer cells: nuclei wrapped in HER2 that is not
        autofluorescence (see `histo.network.screen_mask`).
    read_pyramid : bool
        Network only: read the chunks from the slide's pyramid level at the model's
        resolution (or a finer one dividing it) where that level holds the area means of full
        resolution, checked on the slide's own tissue (`histo.io.binned_level`): a quarter of
        the pixels to decode on a 0.5 um/px slide. The stored means are rounded to the file's
        integers (within 0.5 counts of those computed here), so an integer file is read there
        only where every channel's autofluorescence is at least 10 counts (the rounding then
        stays within 5% of the network's unit; dark and 8-bit slides read full resolution).
        False: always read full resolution and average it here.
    screen_nucleus_fraction : float
        The screen's nuclei: DAPI (3-um mean) above this fraction of the slide's nuclear level.
    screen_her2_ratio : float
        A nucleus passes when the mean HER2 (over autofluorescence) in the 4-um band around it
        is above this ...
    screen_her2_coverage : float
        ... or more than this fraction of the band is above 1.3x autofluorescence.
    screen_autofluorescence_ratio : float
        With Ki67 imaged, a nucleus whose band is bright in Ki67 (above 2x, this multiple of
        its HER2 and 0.3x the nucleus's Ki67) is a macrophage and is left out.
    screen_margin_um : float
        How far around a passing nucleus the network looks.
    torch_threads : int
        CPU threads of the network per task (0: all cores divided among the parallel tasks).
    runtime : str
        What runs the network on the CPU: "auto" (ONNX Runtime with the model's ONNX export
        where both are there, else PyTorch; `models.runtime`) or "torch" (always PyTorch):
        the same cells either way; or "int8" (the export quantised to 8 bits, faster; its
        cells may differ from the float network's near the operating point, so it is part
        of the run key).
    precision : str
        Arithmetic of the network on a CUDA GPU: "auto" (float16 where it is safe, through
        autocast: the fastest) or "float32" (float32 throughout, TF32 off: the CPU's
        arithmetic, for results that must match a CPU run's to the cell). The CPU always
        computes in float32.
    chunk_size_px : int
        Side of the square core of a chunk, in level-0 pixels.
    halo_px : int
        Context read around each chunk core, in level-0 pixels. Must exceed the diameter of a
        cell so that a cell whose centre lies in the core is seen whole. With the network, the
        model's own halo (its receptive field, ``halo_um`` in its config) is used if larger.
    tissue_pixel_size_um : float
        Pixel size of the pyramid level used for tissue detection.
    link_distance_um : float
        Cells closer than this (centre to centre) belong to one lesion.
    cluster_min_cells, focus_min_cells : int
        A lesion of 1 cell is ``single``, of ``cluster_min_cells`` to ``focus_min_cells - 1``
        cells a ``cluster``, larger a ``focus``.
    nucleus_sigma_um : float
        Smoothing of DAPI before nuclei are thresholded.
    nucleus_threshold : float
        DAPI threshold as a fraction of the slide's typical nuclear DAPI intensity.
    nucleus_min_area_um2 : float
        Smaller DAPI objects are ignored.
    nucleus_min_distance_um : float
        Minimum distance between the centres of two touching nuclei that are split.
    cell_ring_um : float
        Width of the ring around a nucleus where a cell's HER2 is measured.
    her2_min_ratio : float
        A cell is HER2+ when the mean HER2 in its ring is at least this multiple of the tissue
        autofluorescence ...
    her2_pixel_ratio : float
        ... and at least `her2_min_coverage` of its ring pixels are brighter than this multiple
        of the autofluorescence (a red blood cell beside a nucleus lights only part of it).
    her2_min_coverage : float
    autofluorescence_max_ratio : float
        Cells whose ring is bright in Ki67 (or, without Ki67, in DAPI) by more than this multiple
        of that channel's autofluorescence are autofluorescent (macrophages), not HER2+.
    ki67_min_ratio : float
        Within a chunk, before the slide's threshold is known: a nucleus is Ki67+ when its mean
        Ki67 is at least this multiple of the Ki67 autofluorescence (classical detector).
    ki67_threshold : float, "auto" or "detector"
        Nuclear Ki67 above the offset (counts, in `ki67_measure`) from which a cell is Ki67+;
        ``"auto"`` (default): calibrated on the slide's own nuclei (`histo.markers`);
        ``"detector"``: the detector's own calls (the network's Ki67 output; the calibrated
        value is reported).
    ki67_measure : {"mean", "p90"}
        What a nucleus's Ki67 is, for the calibration and the calls: its brightest tenth
        (default: the 90th percentile of its pixels, ``ki67_p90``: granular positives stand
        out of non-specific background spread evenly over the nucleus; BENCHMARKS.md "Ki67
        calls on held-out Ki67 styles") or its mean (``ki67_mean``).
    her2_threshold : float, "auto" or "off"
        Mean HER2 over a detected cell above the offset (counts) below which it is not
        counted; ``"auto"``: calibrated on the slide's ordinary cells (`histo.markers`);
        ``"off"`` (default): the detector's calls stand (the calibrated value is reported).
    her2_min_over_autofluorescence : float
        A detected cell counts only when the HER2 of its cytoplasm is more than this multiple
        of the HER2 autofluorescence would give there, predicted from its cytoplasmic Ki67
        and the slide's own HER2/Ki67 autofluorescence ratio
        (`histo.markers.her2_over_autofluorescence`): bright autofluorescent cells
        (hepatocytes, macrophages) are not HER2+. 0 turns the check off. Needs Ki67 and the
        network detector (the classical one has its own `autofluorescence_max_ratio`).
    her2_min_population_gap : float
        Detected cells whose HER2 is that of unstained tissue (median at most twice the
        slide's HER2 reference or what their autofluorescence gives, or within the HER2 of the
        slide's ordinary cells) and that are separated from all other detections by an empty
        gap of at least this fold change in HER2 are a HER2-negative population and are not
        counted (`histo.markers.negative_population`); the slide's own cells decide. 0 turns
        the check off.
    her2_min_af_population_gap : float
        The same for HER2 over what each cell's own autofluorescence gives (``her2_af_ratio``,
        with Ki67 and the network detector): detections at most twice their autofluorescence
        (median) that lie at least this fold below all other detections are autofluorescent
        tissue (hepatocytes just above ``her2_min_over_autofluorescence``), not HER2+ cells,
        which spread continuously from a few times it upwards. 0 turns the check off.
    """

    method: str = "unet"
    model_path: str | None = None
    device: str = "auto"
    batch_size: int = 4
    screen: bool = True
    read_pyramid: bool = True
    screen_nucleus_fraction: float = 0.08
    screen_her2_ratio: float = 1.0
    screen_her2_coverage: float = 0.25
    screen_autofluorescence_ratio: float = 0.5
    screen_margin_um: float = 8.0
    torch_threads: int = 0
    runtime: str = "auto"
    precision: str = "auto"
    chunk_size_px: int = 2048
    halo_px: int = 64
    tissue_pixel_size_um: float = 8.0
    link_distance_um: float = 25.0
    cluster_min_cells: int = 2
    focus_min_cells: int = 5
    nucleus_sigma_um: float = 0.5
    nucleus_threshold: float = 0.2
    nucleus_min_area_um2: float = 8.0
    nucleus_min_distance_um: float = 4.0
    cell_ring_um: float = 4.0
    her2_min_ratio: float = 2.5
    her2_pixel_ratio: float = 1.2
    her2_min_coverage: float = 0.7
    autofluorescence_max_ratio: float = 3.0
    ki67_min_ratio: float = 4.0
    ki67_threshold: float | str = "auto"
    ki67_measure: str = "p90"
    her2_threshold: float | str = "off"
    her2_min_over_autofluorescence: float = 1.1
    her2_min_population_gap: float = 4.0
    her2_min_af_population_gap: float = 2.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.chunk_size_px < 128:
            raise ValueError(f"chunk_size_px must be at least 128, got {self.chunk_size_px}")
        if self.halo_px < 0:
            raise ValueError(f"halo_px must be >= 0, got {self.halo_px}")
        if not 1 < self.cluster_min_cells < self.focus_min_cells:
            raise ValueError("need 1 < cluster_min_cells < focus_min_cells")
        if not self.her2_min_population_gap >= 0:
            raise ValueError(
                "her2_min_population_gap must be >= 0 (0: no check), got "
                f"{self.her2_min_population_gap!r}"
            )
        if not self.her2_min_af_population_gap >= 0:
            raise ValueError(
                "her2_min_af_population_gap must be >= 0 (0: no check), got "
                f"{self.her2_min_af_population_gap!r}"
            )
        if not self.her2_min_over_autofluorescence >= 0:
            raise ValueError(
                "her2_min_over_autofluorescence must be >= 0 (0: no check), got "
                f"{self.her2_min_over_autofluorescence!r}"
            )
        if self.ki67_measure not in KI67_MEASURES:
            raise ValueError(
                f"ki67_measure must be one of {KI67_MEASURES}, got {self.ki67_measure!r}"
            )
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name, words in (
            ("ki67_threshold", ("auto", "detector")),
            ("her2_threshold", ("auto", "off")),
        ):
            v = getattr(self, name)
            if isinstance(v, str):
                if v not in words:
                    raise ValueError(f"{name} must be a number or one of {words}, got {v!r}")
            elif not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0 or one of {words}, got {v!r}")
            else:
                object.__setattr__(self, name, float(v))

    def to_dict(self) -> dict:
        """Plain dict (for summary.json)."""
        return asdict(self)

    def replace(self, **changes) -> AnalysisConfig:
        """A copy with some fields changed (unknown names raise TypeError)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown AnalysisConfig fields: {sorted(unknown)}")
        return replace(self, **changes)
