"""``attnmem.figures``: the file-only pyplot and the save every plot ends with."""

from __future__ import annotations

from attnmem.figures import pyplot, save


def test_save_writes_a_png_and_frees_the_figure(tmp_path):
    plt = pyplot()
    assert plt.get_backend().lower() == "agg"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save(fig, str(tmp_path / "line.png"))
    assert path == tmp_path / "line.png"
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert fig.number not in plt.get_fignums()
