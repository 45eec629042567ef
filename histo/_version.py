"""The version of lungmets: the one place it is written (read by pyproject.toml)."""

__version__ = "0.1.0"

#: Raised whenever the same slide, settings and model give other results (a change of method,
#: not of speed): part of every run key, so finished results of an older revision are analysed
#: again, and ``lungmets rethreshold`` does not pass them off as current. 2: Ki67 taken out of
#: HER2's bleed-through (2026-12-02). 3: detected cells whose HER2 autofluorescence explains are
#: left out (`histo.markers.her2_over_autofluorescence`). 4: nuclear rims left out of the
#: reference levels' spectral guard (`histo.tissue.RIM_DAPI`). 5: a HER2 reference far above
#: the ordinary nuclei's own HER2 is brought down to it (`histo.tissue.HOST_NUCLEI_MULTIPLE`).
#: 6: detections that form a HER2-negative population of their own are not counted
#: (`histo.markers.negative_population`). 7: the reference levels leave glass and the rims of
#: nuclei out, tell nuclei from bright walls by their DAPI excess and split uneven tissue window
#: by window (`histo.tissue.stain_levels`: bright autofluorescence gave the haze, 7-16x low).
#: 8: the Ki67 threshold from the cancer cells' own populations stays above the slide's
#: negatives and needs an upper population above them (`histo.markers.calibrate_threshold`);
#: a HER2-negative population may also be one its autofluorescence explains. 9: the screen
#: takes a nucleus for a macrophage only where its band outshines it in Ki67
#: (`histo.network.MACROPHAGE_OVER_NUCLEUS`: HER2 bleeding into Ki67 lost foci). 10: a
#: HER2-negative population may also be one whose HER2 is that of the slide's ordinary cells
#: (`histo.markers.negative_population`, ``negative_upper``: the reference at the noise).
#: 11: detections just above their own autofluorescence, 2-fold or more below all others in
#: HER2 over it, are autofluorescent tissue (`AnalysisConfig.her2_min_af_population_gap`).
#: 12: where the cancer cells show two Ki67 populations, each one's spread is that of its flank
#: facing the other (`histo.markers._bimodal`).
#: 13: the network's chunks are read from a pyramid level that holds level 0's block means
#: (`AnalysisConfig.read_pyramid`; values rounded to the file's integers).
ANALYSIS_REVISION = 13
