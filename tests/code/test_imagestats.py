"""pipeline.features.imagestats on synthetic images with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.features import colour as C
from pipeline.features import imagestats as S

SKIN = (228, 205, 195)  # a light, nearly neutral skin tone (white balance leaves it almost unchanged)
LESION = (110, 70, 55)  # dark brown


def disc_image(h=150, w=200, cx=100.0, cy=75.0, r=30.0, skin=SKIN, lesion=LESION, noise=4.0, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    img = np.empty((h, w, 3), dtype=np.float64)
    img[:] = skin
    img[inside] = lesion
    img += rng.normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), inside


@pytest.mark.parametrize(
    "cx, cy, r",
    [(100, 75, 30), (80, 60, 20), (120, 85, 45), (100, 75, 12)],
)
def test_disc_recovered(cx, cy, r):
    img, inside = disc_image(cx=cx, cy=cy, r=r)
    f = S.image_features(img)
    assert f["seg_ok"] and f["seg_status"] == "ok"
    assert f["lesion_width_px"] == pytest.approx(2 * r, abs=4)
    assert f["lesion_height_px"] == pytest.approx(2 * r, abs=4)
    assert f["lesion_width_rel"] == pytest.approx(2 * r / 200, abs=0.02)
    assert f["lesion_area_fraction"] == pytest.approx(inside.mean(), rel=0.12)
    assert f["lesion_aspect_ratio"] == pytest.approx(1.0, abs=0.12)
    assert f["border_compactness"] > 0.8
    assert f["asymmetry"] < 0.1
    expected_offset = math.hypot((cx - 99.5) / 100, (cy - 74.5) / 75)
    assert f["lesion_centre_offset"] == pytest.approx(expected_offset, abs=0.06)
    # the lesion is darker than the skin, by about the painted difference
    skin_l, lesion_l = C.rgb_to_lab(np.array([SKIN, LESION], dtype=np.uint8))[:, 0]
    assert f["lesion_lab_l_mean"] == pytest.approx(lesion_l, abs=3)
    assert f["skin_lab_l_mean"] == pytest.approx(skin_l, abs=3)


def test_ellipse_is_elongated_and_less_compact_shape_is_detected():
    h, w = 150, 200
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = SKIN
    ellipse = ((xx - 100) / 60) ** 2 + ((yy - 75) / 20) ** 2 <= 1
    img[ellipse] = LESION
    f = S.image_features(img)
    assert f["lesion_width_px"] == pytest.approx(120, abs=4)
    assert f["lesion_height_px"] == pytest.approx(40, abs=4)
    assert f["lesion_elongation"] == pytest.approx(3.0, rel=0.1)
    assert f["lesion_aspect_ratio"] == pytest.approx(3.0, rel=0.12)

    star = img.copy()
    star[:] = SKIN
    theta = np.arctan2(yy - 75, xx - 100)
    radius = 25 + 15 * np.cos(5 * theta)  # a five-pointed star: irregular border
    star[np.hypot(xx - 100, yy - 75) <= radius] = LESION
    g = S.image_features(star)
    disc = S.image_features(disc_image(noise=0)[0])
    assert g["border_compactness"] < disc["border_compactness"] - 0.2


def test_asymmetric_shape_scores_higher():
    h, w = 150, 200
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = SKIN
    # a disc with a big lobe on one side: asymmetric about the minor axis
    shape = (np.hypot(xx - 90, yy - 75) <= 28) | (np.hypot(xx - 122, yy - 60) <= 14)
    img[shape] = LESION
    f = S.image_features(img)
    sym = S.image_features(disc_image(noise=0)[0])
    assert f["asymmetry"] > sym["asymmetry"] + 0.05


def test_larger_original_gives_sizes_in_its_own_pixels():
    small, _ = disc_image(noise=0, r=30)
    big, _ = disc_image(h=450, w=600, cx=300, cy=225, r=90, noise=0)
    fs, fb = S.image_features(small), S.image_features(big)
    assert (fb["width"], fb["height"]) == (600, 450)
    assert fb["lesion_width_px"] == pytest.approx(3 * fs["lesion_width_px"], rel=0.06)
    assert fb["lesion_area_fraction"] == pytest.approx(fs["lesion_area_fraction"], rel=0.06)
    assert fb["brightness"] == pytest.approx(fs["brightness"], abs=0.01)


def test_no_lesion_is_flagged_not_crashed():
    rng = np.random.default_rng(1)
    skin = np.clip(np.array(SKIN) + rng.normal(0, 4, (150, 200, 3)), 0, 255).astype(np.uint8)
    f = S.image_features(skin)
    assert not f["seg_ok"]
    assert f["seg_status"] in {"low_contrast", "flat", "empty", "too_small", "too_large"}
    for name in S.lesion_features():
        assert math.isnan(f[name]), name
    assert f["dominant_colour"] == ""
    for name in S.IMAGE_FEATURES:
        assert math.isfinite(f[name]), name
    assert list(f) == list(S.feature_names())


@pytest.mark.parametrize("shape", [(150, 200), (4, 4), (1, 1), (300, 20)])
def test_flat_and_degenerate_images_never_raise(shape):
    img = np.full((*shape, 3), 128, dtype=np.uint8)
    f = S.image_features(img)
    assert not f["seg_ok"]
    assert f["contrast_rms"] == pytest.approx(0.0, abs=1e-6)


def test_wrong_array_is_a_clear_error():
    with pytest.raises(ValueError, match="uint8"):
        S.image_features(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        S.image_features(np.zeros((10, 10, 3), dtype=np.float32))


def test_brightness_contrast_and_colour_statistics_known_values():
    grey = np.full((100, 100, 3), 128, dtype=np.uint8)
    f = S.image_features(grey)
    assert f["brightness"] == pytest.approx(128 / 255, abs=1e-4)
    assert f["contrast_rms"] == pytest.approx(0.0, abs=1e-6)
    assert f["contrast_p5_95"] == pytest.approx(0.0, abs=1e-6)
    assert f["hsv_s_mean"] == pytest.approx(0.0, abs=1e-6)
    assert f["lab_a_mean"] == pytest.approx(0.0, abs=0.1)
    assert f["lab_b_mean"] == pytest.approx(0.0, abs=0.1)

    half = np.zeros((100, 100, 3), dtype=np.uint8)
    half[:, 50:] = 255
    f = S.image_features(half)
    assert f["brightness"] == pytest.approx(0.5, abs=1e-4)
    assert f["contrast_rms"] == pytest.approx(0.5, abs=1e-4)
    assert f["contrast_p5_95"] == pytest.approx(1.0, abs=1e-6)
    assert f["lab_l_mean"] == pytest.approx(50.0, abs=0.1)
    assert f["lab_l_std"] == pytest.approx(50.0, abs=0.1)
    assert f["hsv_v_mean"] == pytest.approx(0.5, abs=1e-4)

    red = np.zeros((40, 60, 3), dtype=np.uint8)
    red[..., 0] = 255
    f = S.image_features(red)
    assert (f["r_mean"], f["g_mean"], f["b_mean"]) == pytest.approx((1.0, 0.0, 0.0), abs=1e-6)
    assert (f["r_std"], f["g_std"], f["b_std"]) == pytest.approx((0.0, 0.0, 0.0), abs=1e-6)
    assert f["hsv_s_mean"] == pytest.approx(1.0, abs=1e-6)
    assert f["brightness"] == pytest.approx(0.299, abs=1e-4)
    # sRGB red in CIELAB (D65): L* 53.24, a* 80.09, b* 67.20
    assert (f["lab_l_mean"], f["lab_a_mean"], f["lab_b_mean"]) == pytest.approx((53.24, 80.09, 67.20), abs=0.15)
    assert (f["width"], f["height"], f["aspect_ratio"]) == (60, 40, pytest.approx(1.5))


def test_rgb_to_lab_reference_values():
    lab = C.rgb_to_lab(
        np.array([[255, 255, 255], [0, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]], dtype=np.uint8)
    )
    expected = [(100, 0, 0), (0, 0, 0), (87.73, -86.18, 83.18), (32.30, 79.19, -107.86), (53.59, 0, 0)]
    np.testing.assert_allclose(lab, expected, atol=0.15)


def test_each_reference_colour_is_classified_as_itself():
    rgb = np.array([C.ABCD_EXAMPLES[c] for c in S.ABCD_COLOURS], dtype=np.uint8)
    idx = C.classify_colours(C.rgb_to_lab(rgb).T)
    assert [S.ABCD_COLOURS[i] for i in idx] == list(S.ABCD_COLOURS)
    # green and mid-grey pixels belong to none of the six colours
    others = np.array([[60, 160, 60], [30, 90, 30], [150, 150, 150]], dtype=np.uint8)
    assert list(C.classify_colours(C.rgb_to_lab(others).T)) == [-1, -1, -1]


@pytest.mark.parametrize(
    "painted",
    [
        ("dark_brown", "black", "blue_grey"),
        ("light_brown", "red"),
        ("dark_brown",),
        ("black", "red", "light_brown", "blue_grey"),
    ],
)
def test_colour_detector_finds_painted_colours_and_no_others(painted):
    h, w = 150, 200
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = (240, 238, 236)  # bright neutral skin: every painted colour is darker
    inside = np.hypot(xx - 100, yy - 75) <= 45
    sector = ((np.arctan2(yy - 75, xx - 100) + np.pi) / (2 * np.pi) * len(painted)).astype(int) % len(painted)
    for i, name in enumerate(painted):
        img[inside & (sector == i)] = C.ABCD_EXAMPLES[name]
    f = S.image_features(img)
    assert f["seg_ok"], f["seg_status"]
    found = {c for c in S.ABCD_COLOURS if f[f"colour_{c}"] == 1.0}
    assert found == set(painted)
    assert f["n_colours"] == len(painted)
    for c in painted:
        assert f[f"colour_share_{c}"] == pytest.approx(1 / len(painted), abs=0.12)


def test_colour_presence_threshold_uses_min_share():
    lab = C.rgb_to_lab(np.array([C.ABCD_EXAMPLES["black"]] * 97 + [C.ABCD_EXAMPLES["red"]] * 3, dtype=np.uint8)).T
    shares, present = C.colour_presence(lab, S.FeatureConfig(colour_min_share=0.05))
    assert shares[S.ABCD_COLOURS.index("red")] == pytest.approx(0.03)
    assert present[S.ABCD_COLOURS.index("black")] and not present[S.ABCD_COLOURS.index("red")]
    _, present = C.colour_presence(lab, S.FeatureConfig(colour_min_share=0.02))
    assert present[S.ABCD_COLOURS.index("red")]


def test_kmeans_palette_recovers_two_colours():
    a = np.tile([[30.0, 20.0, 10.0]], (700, 1))
    b = np.tile([[70.0, 5.0, 25.0]], (300, 1))
    x = np.vstack([a, b]) + np.random.default_rng(0).normal(0, 1, (1000, 3))
    centres, shares = C.kmeans_palette(x, k=2, iters=8, max_samples=256)
    assert shares == pytest.approx([0.7, 0.3], abs=0.03)
    np.testing.assert_allclose(centres[0], [30, 20, 10], atol=1.0)
    np.testing.assert_allclose(centres[1], [70, 5, 25], atol=1.0)


def test_vignette_and_hair_do_not_break_the_segmentation():
    img, _ = disc_image(r=25, noise=2)
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    img[np.hypot((xx - 99.5) / 100, (yy - 74.5) / 75) > 1.05] = (8, 6, 6)  # dark vignette corners
    for x0 in (30, 70, 140):  # thin dark hairs across the image
        img[:, x0 : x0 + 1] = (40, 30, 25)
    img[40:41, :] = (40, 30, 25)
    f = S.image_features(img)
    assert f["seg_ok"], f["seg_status"]
    assert f["lesion_width_px"] == pytest.approx(50, abs=6)
    assert f["lesion_height_px"] == pytest.approx(50, abs=6)


def test_features_are_deterministic():
    img, _ = disc_image(seed=3)
    assert S.image_features(img) == S.image_features(img.copy())


def test_config_validation():
    with pytest.raises(ValueError, match="min_area_fraction"):
        S.FeatureConfig(min_area_fraction=0.5, max_area_fraction=0.4)
    with pytest.raises(ValueError, match="working_max_side"):
        S.FeatureConfig(working_max_side=4)
