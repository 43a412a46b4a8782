"""The unpack-and-layout step of `convbert glue-download`, on archives made here (no network)."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from convbert.cli import main
from convbert.errors import ConvBertError
from convbert.finetune.glue_download import build_mrpc, install_archive, install_ax, safe_extract
from convbert.finetune.tasks import find_split_file, read_split


def _zip(path: Path, members: dict[str, str], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


COLA = {
    "CoLA/train.tsv": "gj04\t1\t\tthe cat sat .\ngj04\t0\t*\tcat the sat .\n",
    "CoLA/dev.tsv": "gj04\t1\t\the said \"hi .\n",
    "CoLA/test.tsv": "index\tsentence\n0\ta dog .\n1\tthe dog .\n",
    "CoLA/original/raw/in_domain_train.tsv": "x\n",
    "__MACOSX/CoLA/._train.tsv": "junk",
}


@pytest.mark.parametrize("layout,folder", [("glue", "CoLA"), ("convbert", "cola")])
def test_install_task_archive_both_layouts(tmp_path, layout, folder):
    z = _zip(tmp_path / "CoLA.zip", COLA)
    dest = install_archive(z, tmp_path / "glue", "cola", layout)
    assert dest == tmp_path / "glue" / folder
    assert sorted(p.name for p in dest.iterdir()) == ["dev.tsv", "original", "test.tsv", "train.tsv"]
    assert len(read_split(tmp_path / "glue", "cola", "train").examples) == 2
    assert not (tmp_path / "glue" / "__MACOSX").exists()
    assert [p.name for p in (tmp_path / "glue").iterdir()] == [folder]  # temp folders cleaned up


def test_install_ax_both_layouts(tmp_path):
    ax = tmp_path / "AX.tsv"
    ax.write_text("index\tsentence1\tsentence2\n0\ta\tb\n")
    assert install_ax(ax, tmp_path / "g1", "glue") == tmp_path / "g1" / "diagnostic" / "diagnostic.tsv"
    assert install_ax(ax, tmp_path / "g2", "convbert") == tmp_path / "g2" / "mnli" / "diagnostic.tsv"
    z = _zip(tmp_path / "AX.zip", {"AX/AX.tsv": ax.read_text()})
    install_ax(z, tmp_path / "g3", "glue")
    assert find_split_file(tmp_path / "g3", "ax", "AX") is not None
    assert len(read_split(tmp_path / "g2", "ax", "AX").examples) == 1


@pytest.mark.parametrize(
    "name", ["/etc/evil.tsv", "CoLA/../../evil.tsv", "..\\evil.tsv", "C:/evil.tsv"]
)
def test_refuses_unsafe_zip_members(tmp_path, name):
    z = _zip(tmp_path / "bad.zip", {"CoLA/train.tsv": "x\n", name: "evil"})
    with pytest.raises(ConvBertError, match="refusing member"):
        install_archive(z, tmp_path / "glue", "cola")
    assert not (tmp_path / "evil.tsv").exists()
    assert not (tmp_path / "glue" / "CoLA").exists()  # nothing written: members are checked first


def test_refuses_links(tmp_path):
    z = _zip(tmp_path / "link.zip", {"CoLA/train.tsv": "x\n"}, symlinks={"CoLA/dev.tsv": "/etc/passwd"})
    with pytest.raises(ConvBertError, match="links"):
        safe_extract(z, tmp_path / "x")
    t = tmp_path / "link.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        info = tarfile.TarInfo("CoLA/train.tsv")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(ConvBertError, match="links"):
        safe_extract(t, tmp_path / "y")
    t2 = tmp_path / "dots.tar"
    with tarfile.open(t2, "w") as tf:
        data = b"evil"
        info = tarfile.TarInfo("../evil.tsv")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ConvBertError, match=r"'\.\.'"):
        safe_extract(t2, tmp_path / "z")


def test_build_mrpc_from_senteval_files(tmp_path):
    head = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    (tmp_path / "tr.txt").write_text(
        head + "\n1\t11\t12\tHe said \"yes\tHe agreed\n0\t21\t22\ta\tb\n1\t31\t32\tc\td\n", encoding="utf-8")
    (tmp_path / "te.txt").write_text(head + "\n1\t41\t42\te\tf\n0\t51\t52\tg\th\n", encoding="utf-8")
    (tmp_path / "ids.tsv").write_text("21\t22\n")
    d = build_mrpc(tmp_path / "tr.txt", tmp_path / "te.txt", tmp_path / "ids.tsv", tmp_path / "g", "glue")
    assert (d / "train.tsv").read_text().splitlines()[0] == "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    train = read_split(tmp_path / "g", "mrpc", "train").examples
    assert [e.text_a for e in train] == ['He said "yes', "c"]
    assert [e.text_a for e in read_split(tmp_path / "g", "mrpc", "dev").examples] == ["a"]
    test = read_split(tmp_path / "g", "mrpc", "test").examples
    assert [(e.index, e.text_a, e.text_b) for e in test] == [("0", "e", "f"), ("1", "g", "h")]


def test_glue_download_command_with_local_urls(tmp_path, capsys):
    src = tmp_path / "mirror"
    src.mkdir()
    _zip(src / "RTE.zip", {"RTE/train.tsv": "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n",
                           "RTE/dev.tsv": "index\tsentence1\tsentence2\tlabel\n",
                           "RTE/test.tsv": "index\tsentence1\tsentence2\n0\ta\tb\n"})
    (src / "AX.tsv").write_text("index\tsentence1\tsentence2\n0\ta\tb\n")
    out = tmp_path / "glue"
    rc = main(["glue-download", "--output", str(out), "--tasks", "rte,ax", "--layout", "convbert",
               "--base-url", src.as_uri()])
    assert rc == 0
    assert (out / "rte" / "train.tsv").is_file() and (out / "mnli" / "diagnostic.tsv").is_file()
    rc = main(["glue-download", "--output", str(out), "--tasks", "cola", "--base-url", src.as_uri()])
    assert rc == 2
    assert "cannot download" in capsys.readouterr().err


def test_layout_from_a_folder_of_downloads(tmp_path):
    src = tmp_path / "dl"
    src.mkdir()
    _zip(src / "CoLA.zip", COLA)
    _zip(src / "QNLIv2.zip", {"QNLI/train.tsv": "index\tquestion\tsentence\tlabel\n0\ta\tb\tentailment\n",
                              "QNLI/dev.tsv": "index\tquestion\tsentence\tlabel\n",
                              "QNLI/test.tsv": "index\tquestion\tsentence\n0\ta\tb\n"})
    head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    (src / "msr_paraphrase_train.txt").write_text(head + "1\t1\t2\ta\tb\n0\t3\t4\tc\td\n")
    (src / "msr_paraphrase_test.txt").write_text(head + "1\t5\t6\te\tf\n")
    (src / "mrpc_dev_ids.tsv").write_text("3\t4\n")
    (src / "AX.tsv").write_text("index\tsentence1\tsentence2\n0\ta\tb\n")
    out = tmp_path / "glue"
    assert main(["glue-download", "--output", str(out), "--from-dir", str(src), "--layout", "convbert",
                 "--tasks", "cola,mrpc,qnli,ax"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cola", "mnli", "mrpc", "qnli"]
    assert len(read_split(out, "mrpc", "dev").examples) == 1 and len(read_split(out, "ax", "AX").examples) == 1
    with pytest.raises(ConvBertError, match="no RTE.zip"):
        from convbert.finetune.glue_download import layout_glue

        layout_glue(src, out, ["rte"])


def test_a_zip_with_a_bad_checksum_is_a_one_line_error_and_leaves_nothing(tmp_path, capsys):
    src = tmp_path / "dl"
    src.mkdir()
    z = _zip(src / "RTE.zip", {"RTE/train.tsv": "index\tsentence1\tsentence2\tlabel\n" + "0\ta\tb\tentailment\n" * 50,
                               "RTE/dev.tsv": "index\tsentence1\tsentence2\tlabel\n",
                               "RTE/test.tsv": "index\tsentence1\tsentence2\n0\ta\tb\n"})
    data = bytearray(z.read_bytes())
    at = data.index(b"0\ta\tb\tentailment")  # stored uncompressed: flip a byte of the member's contents
    data[at] ^= 0x01
    z.write_bytes(bytes(data))
    out = tmp_path / "glue"
    assert main(["glue-download", "--output", str(out), "--from-dir", str(src), "--tasks", "rte"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{z}: the archive is damaged" in err and "CRC" in err
    assert not out.exists()


def test_a_missing_or_damaged_later_file_leaves_no_half_built_folder(tmp_path, capsys):
    """Every file is looked up before anything is installed, and a damaged archive after a good one removes the
    folder the command created (it used to keep CoLA/ when SST-2's zip was missing)."""
    src = tmp_path / "dl"
    src.mkdir()
    _zip(src / "CoLA.zip", COLA)
    (src / "AX.tsv").write_text("index\tsentence1\tsentence2\n0\ta\tb\n")
    out = tmp_path / "glue"
    assert main(["glue-download", "--output", str(out), "--from-dir", str(src), "--tasks", "cola,sst,ax"]) == 2
    assert "no SST-2.zip or SST.zip for SST-2" in capsys.readouterr().err
    assert not out.exists()
    (src / "RTE.zip").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["glue-download", "--output", str(out), "--from-dir", str(src), "--tasks", "cola,rte"]) == 2
    assert "RTE.zip" in capsys.readouterr().err
    assert not out.exists()
    assert main(["glue-download", "--output", str(out), "--from-dir", str(src), "--tasks", "cola,ax"]) == 0
    assert len(read_split(out, "cola", "train").examples) == 2


def test_a_download_shorter_than_its_content_length_is_refused(tmp_path, capsys):
    import http.server
    import threading

    body = b"index\tsentence1\tsentence2\n0\ta\tb\n"

    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) * 2))
            self.end_headers()
            self.wfile.write(body)  # then the connection closes early

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=server.handle_request, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    out = tmp_path / "glue"
    try:
        rc = main(["glue-download", "--output", str(out), "--tasks", "ax", "--base-url", url])
    finally:
        server.server_close()
    err = capsys.readouterr().err
    assert rc == 2 and "cannot download" in err, err
    assert not (out / "diagnostic" / "diagnostic.tsv").exists()
