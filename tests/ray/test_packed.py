"""data.pretokenize: a domain packed once into Parquet holds exactly the rows the text stream yields, is
reused while its inputs stay the same, packs anew when they change, and fails with the file and line of a
bad record, leaving nothing half-written (local disk and S3)."""

from __future__ import annotations

import gzip
import shutil
from dataclasses import replace

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from ray_lifelong.config import load_config
from ray_lifelong.data import markers
from ray_lifelong.data.markers import write_in_order
from ray_lifelong.data.packed import MARKER, pack_domain, packed_dataset, read_parquet_in_order, training_rows
from ray_lifelong.data.run_tokenizer import prepare_tokenizer
from ray_lifelong.data.sources import DataError
from ray_lifelong.data.stream import StreamOptions, files_dataset
from tests.conftest import moto_fs, moto_server, tiny_overrides

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module", autouse=True)
def s3():
    """Started before the module's Ray cluster, whose workers then hold its test credentials: autouse, so
    that it comes first whichever test of the module runs first (``-k`` may pick one that needs no S3)."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def setup(s3, ray_4cpus, demo_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    cfg = load_config(None, tiny_overrides(demo_corpus, out) + ["data.pretokenize=true"])
    tok = prepare_tokenizer(cfg, out / "tok")
    return cfg, StreamOptions(tok, cfg.model.arch, cfg.data), out


def rows(ds) -> tuple[np.ndarray, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=512, batch_format="numpy"))
    return (
        np.concatenate([b["input_ids"] for b in batches]),
        np.concatenate([b["domain_id"] for b in batches]),
    )


def test_packed_rows_are_the_streamed_rows_in_order(setup):
    cfg, opts, out = setup
    dom = cfg.data.domains[1]
    rec = pack_domain(1, dom, opts, str(out / "p"), prompts=True)
    ids, dom_ids = rows(packed_dataset([rec]))
    want_ids, want_dom = rows(files_dataset([(1, dom)], "train", opts, prompts=True))
    assert rec["rows"] == len(ids) == len(want_ids) > 20 and rec["tokens"] == rec["rows"] * cfg.data.seq_len
    np.testing.assert_array_equal(ids, want_ids)
    assert (dom_ids == 1).all() and (want_dom == 1).all()


def _domain_docs(opts, dom) -> list[list[list[int]]]:
    """The token ids of every document of ``dom``'s training files, file by file, in stream order."""
    from ray_lifelong.data.sources import iter_documents, resolve_sources
    from ray_lifelong.data.tokenizer import load_tokenizer

    tok = load_tokenizer(opts.tokenizer_dir)
    return [
        [
            tok(t, add_special_tokens=False)["input_ids"]
            for t in iter_documents(f, fmt=dom.format, text_field=dom.text_field)
        ]
        for f in resolve_sources(dom.train, what="train")
    ]


def _stream(opts, dom, index: int, **data) -> np.ndarray:
    o = replace(opts, data=replace(opts.data, **data))
    return rows(files_dataset([(index, dom)], "train", o, prompts=True))[0]


def test_one_tokenizer_actor_packs_the_stream_as_a_whole(setup):
    """Small batches through one actor: every batch's leftover carries on, in stream order, so the rows are
    those of packing all the domain's documents in one call."""
    from ray_lifelong.data.packing import pack
    from ray_lifelong.data.stream import pack_spec
    from ray_lifelong.data.tokenizer import load_tokenizer, prompt_token

    cfg, opts, _ = setup
    dom = cfg.data.domains[1]
    docs = [d for f in _domain_docs(opts, dom) for d in f]
    spec = pack_spec(
        load_tokenizer(opts.tokenizer_dir), cfg.data.seq_len, cfg.model.arch, prompt_token(dom.name)
    )
    want, _ = pack(docs, spec)
    got = _stream(opts, dom, 1, tokenize_batch_size=8, tokenize_actors=1)
    assert len(docs) > 8 * 10 and len(got) > 20
    np.testing.assert_array_equal(got, want)


def test_a_pool_of_tokenizer_actors_packs_each_batch_alone(setup):
    """Two actors take batches as they come free: each batch is packed on its own, so the rows do not depend
    on which actor got which batch (with a carry they would)."""
    from ray_lifelong.data.packing import pack
    from ray_lifelong.data.stream import pack_spec
    from ray_lifelong.data.tokenizer import load_tokenizer, prompt_token

    cfg, opts, _ = setup
    dom = cfg.data.domains[1]
    bs = 8
    files = _domain_docs(opts, dom)
    assert all(len(f) % bs == 0 for f in files)  # so Ray's batches are these groups however it bundles blocks
    spec = pack_spec(
        load_tokenizer(opts.tokenizer_dir), cfg.data.seq_len, cfg.model.arch, prompt_token(dom.name)
    )
    want = np.concatenate([pack(f[i : i + bs], spec)[0] for f in files for i in range(0, len(f), bs)])
    for _ in range(2):
        np.testing.assert_array_equal(_stream(opts, dom, 1, tokenize_batch_size=bs, tokenize_actors=2), want)


class _Identity:
    def __call__(self, batch):
        return batch


def test_rows_are_written_in_the_stream_order(ray_4cpus, tmp_path):
    """Many small blocks out of an actor pool (as the tokenizer's): Ray Data's ``write_parquet`` wrote
    them out of order in 4 of 5 tries on a 2-core machine (its write tasks hand several blocks to pyarrow's
    threaded writer); a packed domain must read back in the order its stream yields."""
    import ray.data

    for k in range(2):
        ds = ray.data.range(20000, override_num_blocks=200).map_batches(
            _Identity, batch_size=50, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2)
        )
        assert write_in_order(ds, str(tmp_path / str(k)), rows_per_file=3000) == 20000
        names = sorted(p.name for p in (tmp_path / str(k)).iterdir())
        assert names == [f"part-{i:06d}.parquet" for i in range(7)]
        back = read_parquet_in_order([str(tmp_path / str(k))])
        np.testing.assert_array_equal(
            np.concatenate([b["id"] for b in back.iter_batches(batch_format="numpy")]), np.arange(20000)
        )


def test_the_memory_of_the_packed_domain_is_the_memory_of_its_text(setup, tmp_path):
    """Ray Data cuts the two into different blocks; the replay memory must not depend on that."""
    import pyarrow.parquet as pq

    from ray_lifelong.data.memory import write_memory

    cfg, opts, out = setup
    dom = cfg.data.domains[1]
    rec = pack_domain(1, dom, opts, str(out / "p"), prompts=True)
    kw = dict(fraction=0.2, max_sequences=None, seed=5)
    text = write_memory(files_dataset([(1, dom)], "train", opts, prompts=True), str(tmp_path / "text"), **kw)
    packed = write_memory(packed_dataset([rec]), str(tmp_path / "packed"), **kw)
    assert text["sequences"] == packed["sequences"] > 0
    assert pq.read_table(str(tmp_path / "text")).equals(pq.read_table(str(tmp_path / "packed")))
    capped = [
        write_memory(ds, str(tmp_path / name), **{**kw, "max_sequences": 7})
        for name, ds in (
            ("ct", files_dataset([(1, dom)], "train", opts, prompts=True)),
            ("cp", packed_dataset([rec])),
        )
    ]
    assert capped[0]["sequences"] == capped[1]["sequences"] == 7
    assert pq.read_table(str(tmp_path / "ct")).equals(pq.read_table(str(tmp_path / "cp")))
    # the same sample written in another order and other files: the workers' pools (replay draws and the
    # warmup pick rows by position in them) are the same
    from ray_lifelong.data.memory import keyed_shuffle, read_memories

    cut = write_memory(
        keyed_shuffle(packed_dataset([rec]), seed=9).repartition(3), str(tmp_path / "cut"), **kw
    )
    assert cut["sequences"] == text["sequences"]
    assert not pq.read_table(str(tmp_path / "cut")).equals(pq.read_table(str(tmp_path / "packed")))
    pools = [read_memories([str(tmp_path / n)]) for n in ("text", "packed", "cut")]
    assert all(p[1] == [1] and torch.equal(p[0][0], pools[0][0][0]) for p in pools)
    # the shuffle of a joint stage and of the FRW's memory stream: one order for both block layouts
    from ray_lifelong.data.memory import keyed_shuffle

    a = rows(keyed_shuffle(files_dataset([(1, dom)], "train", opts, prompts=True), seed=3))[0]
    b = rows(keyed_shuffle(packed_dataset([rec]), seed=3))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, rows(packed_dataset([rec]))[0])  # shuffled
    assert not np.array_equal(a, rows(keyed_shuffle(packed_dataset([rec]), seed=4))[0])


def test_packing_is_reused_until_an_input_changes(setup, demo_corpus, tmp_path):
    cfg, opts, _ = setup
    src = tmp_path / "src"
    shutil.copytree(demo_corpus / "sports", src)
    dom = replace(cfg.data.domains[0], train=[str(src / "train-*.jsonl.gz")])
    root = str(tmp_path / "p")
    first = pack_domain(0, dom, opts, root, prompts=False)
    files = sorted((tmp_path / "p").rglob("*.parquet"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert pack_domain(0, dom, opts, root, prompts=False) == first
    assert [
        f.stat().st_mtime_ns for f in sorted((tmp_path / "p").rglob("*.parquet"))
    ] == mtimes  # not rewritten
    # the stream of a pretokenized config reads the packed rows
    np.testing.assert_array_equal(
        rows(training_rows([(0, dom)], opts, prompts=False, packed_root=root))[0],
        rows(packed_dataset([first]))[0],
    )
    prompted = pack_domain(0, dom, opts, root, prompts=True)
    assert prompted["uri"] != first["uri"]
    shutil.copy(src / "train-00.jsonl.gz", src / "train-09.jsonl.gz")  # a new shard arrived
    grown = pack_domain(0, dom, opts, root, prompts=False)
    assert grown["uri"] != first["uri"] and grown["rows"] > first["rows"]
    assert not list((tmp_path / "p").glob("*.tmp-*"))


def test_a_bad_record_names_file_and_line_and_leaves_nothing(setup, demo_corpus, tmp_path):
    cfg, opts, _ = setup
    src = tmp_path / "src"
    shutil.copytree(demo_corpus / "sports", src)
    with gzip.open(src / "train-01.jsonl.gz", "ab") as f:
        f.write(b'{"text": broken\n')
    dom = replace(cfg.data.domains[0], train=[str(src / "train-*.jsonl.gz")])
    with pytest.raises(
        DataError, match=r"packing domain 'sports': .*train-01\.jsonl\.gz, line \d+: invalid JSON"
    ):
        pack_domain(0, dom, opts, str(tmp_path / "p"), prompts=False)
    assert not list((tmp_path / "p").glob("*"))


def test_of_two_racing_packers_the_first_move_wins(tmp_path):
    for name, rows_ in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        markers.write_marker(str(tmp_path / name), MARKER, {"rows": rows_})
    assert markers.move_dir(str(tmp_path / "a"), str(tmp_path / "final"), MARKER)
    assert not markers.move_dir(str(tmp_path / "b"), str(tmp_path / "final"), MARKER)
    assert markers.read_marker(str(tmp_path / "final"), MARKER) == {"rows": 1}
    (tmp_path / "stale").mkdir()  # a directory without its marker: cut short, replaced
    (tmp_path / "stale" / "x.parquet").write_bytes(b"partial")
    assert markers.move_dir(str(tmp_path / "b"), str(tmp_path / "stale"), MARKER)
    assert not (tmp_path / "stale" / "x.parquet").exists()


def test_packed_domains_on_s3(setup, s3):
    cfg, opts, _ = setup
    dom = cfg.data.domains[0]
    endpoint = s3
    fs = moto_fs(endpoint)
    fs.create_dir("packs")
    root = f"s3://packs/run?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    rec = pack_domain(0, dom, opts, root, prompts=True)
    assert rec["uri"].startswith("s3://packs/run/00-sports-") and rec["uri"].endswith(
        f"?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    )
    np.testing.assert_array_equal(
        rows(packed_dataset([rec]))[0], rows(files_dataset([(0, dom)], "train", opts, prompts=True))[0]
    )
    assert pack_domain(0, dom, opts, root, prompts=True) == rec
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector("packs/run"))]
    assert len(names) == 1 and ".tmp-" not in names[0]


def test_validation_rows_are_the_rows_of_the_valid_files_streamed_through_one_tokenizer_actor(setup):
    """Read in the driver's process, the validation rows are those the Ray Data stream of every domain's
    valid files (two files each) gives through one tokenizer actor, cut to the scored rows; they do not
    depend on the tokenizer pool the training streams use."""
    from ray_lifelong.data.stream import scored_rows, validation_rows

    cfg, opts, _ = setup
    o = replace(opts, data=replace(opts.data, tokenize_batch_size=4, eval_max_sequences=3))
    ids, dom = rows(files_dataset(list(enumerate(cfg.data.domains)), "valid", o, prompts=True))
    want = scored_rows(ids, dom, 2, 3)
    assert set(dom[: len(want.domain_id)].tolist()) == {0, 1} and len(want.domain_id) > 6
    for actors in (1, 2):
        got = validation_rows(cfg.data.domains, replace(o, data=replace(o.data, tokenize_actors=actors)),
                              prompts=True)
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        np.testing.assert_array_equal(got.domain_id, want.domain_id)


def test_a_single_worker_reads_its_stream_unsplit_as_a_split_of_one_hands_it(setup):
    """A one-worker run does not split its training streams (a split starts a coordinator process per
    stream): the rows, in their order, are those a split of one hands that worker, across small batches."""
    from ray.train import DataConfig

    cfg, opts, _ = setup
    o = replace(opts, data=replace(opts.data, tokenize_batch_size=8))
    ds = files_dataset([(1, cfg.data.domains[1])], "train", o, prompts=True)
    [split] = DataConfig(datasets_to_split=["t"]).configure(
        {"t": ds}, world_size=1, worker_handles=None, worker_node_ids=None)
    [whole] = DataConfig(datasets_to_split=[]).configure(
        {"t": ds}, world_size=1, worker_handles=None, worker_node_ids=None)
    got, want = rows(whole["t"])[0], rows(split["t"])[0]
    assert len(want) > 20
    np.testing.assert_array_equal(got, want)
