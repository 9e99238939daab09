"""Configuration: docs/algorithm.md section 2 defaults and validation."""

import dataclasses

import numpy as np
import pytest

import gpumatch as gm
from gpumatch import ConfigError, ModelPsfMatchConfig

# docs/algorithm.md section 2, copied from the table.
SPEC_DEFAULTS = {
    "kernelBasisSet": "alard-lupton",
    "kernelSize": 21,
    "scaleByFwhm": False,
    "kernelSizeFwhmScaling": 6.0,
    "kernelSizeMin": 21,
    "kernelSizeMax": 35,
    "alardNGauss": 3,
    "alardSigGauss": (0.7, 1.5, 3.0),
    "alardDegGauss": (4, 2, 2),
    "alardGaussBeta": 2.0,
    "alardMinSig": 0.7,
    "alardMinSigDeconv": 0.4,
    "spatialModelType": "chebyshev1",
    "spatialKernelOrder": 2,
    "fitForBackground": False,
    "spatialBgOrder": 1,
    "sizeCellX": 128,
    "sizeCellY": 128,
    "constantVarianceWeighting": True,
    "conditionNumberType": "EIGENVALUE",
    "maxSpatialConditionNumber": 1e10,
    "doAutoPadPsf": True,
    "autoPadPsfTo": 1.4,
    "padPsfBy": 0,
    # The verdict's thresholds (gpumatch.verdict), added to section 2's table.
    "maxMatchedPsfResidual": 0.01,
    "maxFwhmError": 0.01,
}


def test_every_default_matches_spec():
    cfg = ModelPsfMatchConfig()
    assert set(ModelPsfMatchConfig.field_names()) == set(SPEC_DEFAULTS)
    for name, value in SPEC_DEFAULTS.items():
        got = getattr(cfg, name)
        if isinstance(value, tuple):
            assert tuple(got) == value, name
        else:
            assert got == value and type(got) is type(value), (name, got)


def test_task_default_config_is_spec_default():
    task = gm.ModelPsfMatchTask(backend="numpy")
    assert task.config.to_dict() == ModelPsfMatchConfig().to_dict()
    assert task.ConfigClass is ModelPsfMatchConfig


@pytest.mark.parametrize("field, value", [
    ("kernelBasisSet", "gaussian-mix"),
    ("kernelSize", 20),
    ("kernelSize", 1),
    ("kernelSize", 2.5),
    ("kernelSize", True),
    ("scaleByFwhm", "yes"),
    ("kernelSizeFwhmScaling", 0.5),
    ("kernelSizeMin", 1),
    ("alardNGauss", 0),
    ("alardGaussBeta", -1.0),
    ("alardMinSig", 0.2),
    ("alardMinSigDeconv", 0.1),
    ("spatialModelType", "legendre"),
    ("spatialKernelOrder", -1),
    ("spatialBgOrder", -1),
    ("sizeCellX", 16),
    ("sizeCellY", 31),
    ("conditionNumberType", "TRACE"),
    ("maxSpatialConditionNumber", 0.0),
    ("maxSpatialConditionNumber", float("nan")),
    ("maxMatchedPsfResidual", 0.0),
    ("maxMatchedPsfResidual", -0.01),
    ("maxMatchedPsfResidual", float("inf")),
    ("maxMatchedPsfResidual", "1%"),
    ("maxFwhmError", 0.0),
    ("maxFwhmError", float("nan")),
    ("doAutoPadPsf", 1),
    ("autoPadPsfTo", 0.99),
    ("autoPadPsfTo", 2.01),
    ("padPsfBy", -2),
    ("constantVarianceWeighting", None),
])
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelPsfMatchConfig(**{field: value})


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        ModelPsfMatchConfig(kernelSize=4)


def test_kernel_size_max_below_min_names_field():
    with pytest.raises(ConfigError, match="kernelSizeMax"):
        ModelPsfMatchConfig(kernelSizeMin=25, kernelSizeMax=23)


@pytest.mark.parametrize("field", ["alardSigGauss", "alardDegGauss"])
def test_list_length_must_equal_alard_n_gauss(field):
    value = (1.0, 2.0) if field == "alardSigGauss" else (4, 2)
    with pytest.raises(ConfigError, match=field) as info:
        ModelPsfMatchConfig(**{field: value})
    assert "alardNGauss" in str(info.value)
    # Consistent lengths are fine.
    cfg = ModelPsfMatchConfig(alardNGauss=2, alardSigGauss=[1.0, 2.0], alardDegGauss=[4, 2])
    assert cfg.alardSigGauss == (1.0, 2.0) and cfg.alardDegGauss == (4, 2)


def test_legal_boundary_values_accepted():
    cfg = ModelPsfMatchConfig(kernelSize=3, kernelSizeMin=3, autoPadPsfTo=1.0, alardMinSig=0.25,
                              alardMinSigDeconv=0.25, sizeCellX=32, sizeCellY=32,
                              spatialKernelOrder=0, alardGaussBeta=0.0, padPsfBy=4,
                              spatialModelType="polynomial", conditionNumberType="SVD")
    assert cfg.kernelSize == 3 and cfg.autoPadPsfTo == 1.0
    assert ModelPsfMatchConfig(autoPadPsfTo=2.0).autoPadPsfTo == 2.0


def test_fit_for_background_rejected_with_reason():
    with pytest.raises(ConfigError, match="fitForBackground"):
        ModelPsfMatchConfig(fitForBackground=True)


def test_from_dict_suggests_close_name():
    with pytest.raises(ConfigError, match=r"kernelsize.*Did you mean 'kernelSize'"):
        ModelPsfMatchConfig.from_dict({"kernelsize": 21})
    with pytest.raises(ConfigError, match="spatialKernelOrder"):
        ModelPsfMatchConfig.from_dict({"spatialKernelOrdr": 1})
    with pytest.raises(ConfigError, match="alardSigGauss"):
        ModelPsfMatchConfig.from_dict({"alardSigGaus": [1.0, 2.0, 4.5]})


def test_from_dict_round_trip_and_validation():
    production = {"kernelSize": 21, "alardSigGauss": [1.0, 2.0, 4.5],
                  "alardDegGauss": [4, 2, 2], "spatialKernelOrder": 2, "sizeCellX": 128}
    cfg = ModelPsfMatchConfig.from_dict(production)
    assert cfg.alardSigGauss == (1.0, 2.0, 4.5)
    again = ModelPsfMatchConfig.from_dict(cfg.to_dict())
    assert again == cfg
    # Values inside from_dict are validated too, naming the field.
    with pytest.raises(ConfigError, match="kernelSize"):
        ModelPsfMatchConfig.from_dict({"kernelSize": 22})


def test_copy_validates():
    cfg = ModelPsfMatchConfig()
    assert cfg.copy(kernelSize=9).kernelSize == 9
    with pytest.raises(ConfigError, match="kernelSize"):
        cfg.copy(kernelSize=8)


def test_mutated_config_is_checked_again_by_run():
    cfg = ModelPsfMatchConfig(kernelSize=9, kernelSizeMin=9)
    task = gm.ModelPsfMatchTask(cfg, backend="numpy")
    cfg.kernelSize = 10  # dataclass fields can be assigned after construction
    exposure = gm.Exposure(np.zeros((64, 64)), psf=gm.GaussianPsf(11, 11, 2.0))
    with pytest.raises(ConfigError, match="kernelSize"):
        task.run(exposure, gm.GaussianPsf(11, 11, 3.0))


def test_task_rejects_non_config():
    with pytest.raises(TypeError, match="ModelPsfMatchConfig"):
        gm.ModelPsfMatchTask({"kernelSize": 21}, backend="numpy")


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="backend"):
        gm.ModelPsfMatchTask(backend="opencl")


def test_config_is_a_dataclass_with_spec_names_only():
    names = [f.name for f in dataclasses.fields(ModelPsfMatchConfig)]
    assert names == ModelPsfMatchConfig.field_names()
    assert len(names) == len(SPEC_DEFAULTS)
