"""sfg_fast.data: schema, MovieLens-100K, Criteo/Avazu readers on generated files, cache, bad input, synthetic."""
import datetime
import gzip
import importlib.util
import math
import os
import random
from collections import Counter, defaultdict

import numpy as np
import pytest

from sfg_fast.data import DATASETS, CTRData, Schema, Split, load_dataset
from sfg_fast.data import synthetic

HAS_RECBOLE = importlib.util.find_spec("recbole") is not None


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def all_rows(data: CTRData):
    return np.concatenate([s.ids for s in data.splits().values()]), np.concatenate(
        [s.labels for s in data.splits().values()])


def assert_well_formed(data: CTRData):
    dims = np.asarray(data.schema.field_dims)
    assert data.schema.oov_ids == [d - 1 for d in data.schema.field_dims]
    for name, split in data.splits().items():
        assert split.ids.dtype == np.int64 and split.labels.dtype == np.float32, name
        assert split.ids.shape == (len(split), data.schema.num_fields), name
        if len(split):
            assert (split.ids >= 0).all() and (split.ids < dims).all(), name
            assert set(np.unique(split.labels).tolist()) <= {0.0, 1.0}, name
    data.check()


def assert_same_data(a: CTRData, b: CTRData):
    assert a.schema == b.schema
    for (name, x), y in zip(a.splits().items(), b.splits().values()):
        np.testing.assert_array_equal(x.ids, y.ids, err_msg=name)
        np.testing.assert_array_equal(x.labels, y.labels, err_msg=name)


def log2_bucket(x: int) -> int:
    """The Criteo bucket, written independently: largest b with b <= ln(x)^2 for x > 2."""
    if x <= 2:
        return x
    square = math.log(x) * math.log(x)
    b = 0
    while b + 1 <= square:
        b += 1
    return b


def one_id_per_group(keys, ids):
    """Map group key -> the single id its rows share; fails if a group has two ids."""
    seen = defaultdict(set)
    for k, i in zip(keys, ids):
        seen[k].add(int(i))
    assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
    return {k: next(iter(v)) for k, v in seen.items()}


# ----------------------------------------------------------------------------------------------
# schema and containers
# ----------------------------------------------------------------------------------------------

def test_schema_json_round_trip(tmp_path):
    schema = Schema(name="toy", field_names=["a", "b", "c"], field_dims=[3, 1, 7])
    assert schema.oov_ids == [2, 0, 6] and schema.num_fields == 3
    np.testing.assert_array_equal(schema.offsets, [0, 3, 4])
    assert schema.offsets.dtype == np.int64
    path = tmp_path / "schema.json"
    schema.save_json(path)
    assert Schema.load_json(path) == schema
    assert Schema.from_dict(schema.to_dict()) == schema


def test_schema_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="oov_ids"):
        Schema("toy", ["a", "b"], [3, 4], oov_ids=[2, 2])
    with pytest.raises(ValueError, match="field_names"):
        Schema("toy", ["a"], [3, 4])
    with pytest.raises(ValueError, match="field_dims"):
        Schema("toy", ["a"], [0])
    with pytest.raises(ValueError, match="lacks keys"):
        Schema.from_dict({"name": "x"})


def test_split_checks_shapes():
    split = Split(np.zeros((4, 2), np.int32), np.ones(4))
    assert len(split) == 4 and split.ids.dtype == np.int64 and split.labels.dtype == np.float32
    with pytest.raises(ValueError, match="labels"):
        Split(np.zeros((4, 2), np.int64), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="ids"):
        Split(np.zeros(4, np.int64), np.zeros(4, np.float32))


def test_unknown_dataset_and_option():
    with pytest.raises(ValueError) as info:
        load_dataset("criteo-1tb")
    for name in DATASETS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="vocab_scal"):
        load_dataset("synthetic-avazu", num_rows=100, vocab_scal=0.5)
    with pytest.raises(ValueError, match="num_rows"):
        load_dataset("criteo", data_dir="/nonexistent", num_rows=10)
    with pytest.raises(ValueError, match="max_rows"):
        load_dataset("synthetic-avazu", max_rows=-1)
    with pytest.raises(ValueError, match="split"):
        load_dataset("synthetic-avazu", num_rows=100, split=(1, 1))


# ----------------------------------------------------------------------------------------------
# MovieLens-100K
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def movielens():
    if not HAS_RECBOLE:
        pytest.skip("recbole is not installed (pip install --no-deps recbole==1.2.1); it ships MovieLens-100K")
    return load_dataset("movielens100k")


def test_movielens_sizes_labels_and_ids(movielens):
    data = movielens
    assert_well_formed(data)
    assert data.schema.field_names == ["user_id", "item_id", "age", "gender", "occupation", "zip3",
                                       "release_year", "genre"]
    assert [len(s) for s in data.splits().values()] == [80000, 10000, 10000]
    # the click count, recomputed from the raw ratings file
    inter = os.path.join(data.info["source"], "ml-100k.inter")
    with open(inter) as f:
        header = f.readline().rstrip("\n").split("\t")
        rating = [h.split(":")[0] for h in header].index("rating")
        clicks = sum(float(line.rstrip("\n").split("\t")[rating]) >= 4 for line in f)
    _, labels = all_rows(data)
    assert int(labels.sum()) == clicks
    assert 0.4 < labels.mean() < 0.7
    # 943 users, 2 genders, 7 age buckets: each vocabulary holds at most the raw values, plus OOV
    dims = dict(zip(data.schema.field_names, data.schema.field_dims))
    assert dims["user_id"] <= 944 and dims["gender"] == 3 and dims["age"] == 8
    # min_count 1: every train value is kept, so OOV never occurs in train
    oov = np.asarray(data.schema.oov_ids)
    assert not (data.train.ids == oov).any()


def test_movielens_deterministic_and_seeded(movielens):
    again = load_dataset("movielens100k")
    assert_same_data(movielens, again)
    other = load_dataset("movielens100k", seed=7)
    assert len(other.train) == len(movielens.train)
    assert not np.array_equal(other.train.labels, movielens.train.labels)


def test_movielens_min_count_maps_rare_values_to_oov(movielens):
    data = load_dataset("movielens100k", min_count=50)
    for f, dim in enumerate(data.schema.field_dims):
        counts = np.bincount(data.train.ids[:, f], minlength=dim)
        kept = counts[:-1]
        assert (kept >= 50).all(), data.schema.field_names[f]
        assert (np.diff(kept) <= 0).all(), "kept ids are ordered by decreasing train frequency"
    assert data.schema.field_dims[0] < movielens.schema.field_dims[0]
    assert (data.train.ids[:, 0] == data.schema.oov_ids[0]).any()
    combo = load_dataset("movielens100k", genre="combination")
    assert combo.schema.field_dims[-1] > movielens.schema.field_dims[-1]
    with pytest.raises(ValueError, match="genre"):
        load_dataset("movielens100k", genre="all")


GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def write_tiny_movielens(folder, layout, bad_rating_line=None):
    """40 users, 60 items (item i rated exactly once when i >= 30), ratings in both layouts."""
    rnd = random.Random(3)
    occupations = ["writer", "doctor", "student"]
    users = [(u, [10, 17, 18, 24, 25, 34, 44, 60][u % 8], "MF"[u % 2], occupations[u % 3], f"{u % 4}{u % 3}9{u:02d}")
             for u in range(1, 41)]
    items = []
    for i in range(1, 61):
        genres = [GENRES[1 + i % 5]] + ([GENRES[7 + i % 3]] if i % 2 else [])
        year = "" if i == 5 else str(1980 + i % 6)
        items.append((i, f"Movie {i}", year, genres))
    ratings = [(rnd.randint(1, 40), rnd.randint(1, 29), rnd.randint(1, 5)) for _ in range(300)]
    ratings += [(rnd.randint(1, 40), i, rnd.randint(1, 5)) for i in range(30, 61)]
    os.makedirs(folder, exist_ok=True)
    lines = [f"{u}\t{i}\t{r}\t{880000000 + n}" for n, (u, i, r) in enumerate(ratings)]
    if bad_rating_line is not None:
        lines[bad_rating_line - (2 if layout == "recbole" else 1)] = "3\t4\tfive\t880000000"
    if layout == "grouplens":
        with open(os.path.join(folder, "u.data"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(folder, "u.user"), "w") as f:
            f.writelines(f"{u}|{a}|{g}|{o}|{z}\n" for u, a, g, o, z in users)
        with open(os.path.join(folder, "u.item"), "w", encoding="latin-1") as f:
            for i, title, year, genres in items:
                date = f"01-Jan-{year}" if year else ""
                flags = "|".join("1" if g in genres else "0" for g in GENRES)
                f.write(f"{i}|{title} ({year})|{date}||http://x/{i}|{flags}\n")
    else:
        with open(os.path.join(folder, "ml-100k.inter"), "w") as f:
            f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "\n".join(lines) + "\n")
        with open(os.path.join(folder, "ml-100k.user"), "w") as f:
            f.write("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
            f.writelines(f"{u}\t{a}\t{g}\t{o}\t{z}\n" for u, a, g, o, z in users)
        with open(os.path.join(folder, "ml-100k.item"), "w") as f:
            f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
            f.writelines(f"{i}\t{t}\t{y or 'unknown'}\t{' '.join(g)}\n" for i, t, y, g in items)
    return ratings, {u[0]: u for u in users}, {i[0]: i for i in items}


def test_movielens_grouplens_layout_and_oov(tmp_path):
    ratings, users, items = write_tiny_movielens(tmp_path / "gl", "grouplens")
    data = load_dataset("movielens100k", data_dir=tmp_path / "gl", seed=5)
    assert_well_formed(data)
    assert data.info["layout"] == "grouplens"
    ids, labels = all_rows(data)
    assert len(labels) == len(ratings) and int(labels.sum()) == sum(r >= 4 for _, _, r in ratings)
    assert sum(len(s) for s in data.splits().values()) == len(ratings)
    # items 30..60 occur once: in valid/test they were never trained on, so they must be OOV;
    # in train they are kept (min_count 1)
    item_oov = data.schema.oov_ids[1]
    assert (data.train.ids[:, 1] != item_oov).all()
    singles_in_train = int((np.bincount(data.train.ids[:, 1]) == 1).sum())
    evaluated = np.concatenate([data.valid.ids[:, 1], data.test.ids[:, 1]])
    assert (evaluated == item_oov).sum() == 31 - singles_in_train > 0
    assert_same_data(data, load_dataset("movielens100k", data_dir=tmp_path / "gl", seed=5))


def test_movielens_both_layouts_agree_and_tokens(tmp_path):
    ratings, users, items = write_tiny_movielens(tmp_path / "gl", "grouplens")
    write_tiny_movielens(tmp_path / "rb", "recbole")
    grouplens = load_dataset("movielens100k", data_dir=tmp_path / "gl", split=(1, 0, 0))
    recbole = load_dataset("movielens100k", data_dir=tmp_path / "rb", split=(1, 0, 0))
    assert recbole.info["layout"] == "recbole"
    assert_same_data(grouplens, recbole)
    # everything in train, in file order: tokens can be checked row by row
    ids = grouplens.train.ids
    assert len(ids) == len(ratings)
    np.testing.assert_array_equal(grouplens.train.labels, [float(r >= 4) for _, _, r in ratings])

    def bucket(age):
        return "<18" if age < 18 else "18-24" if age < 25 else "25-34" if age < 35 else "35-44" if age < 45 \
            else "45-49" if age < 50 else "50-55" if age < 56 else "56+"
    fields = grouplens.schema.field_names
    expected = {
        "user_id": [u for u, _, _ in ratings],
        "item_id": [i for _, i, _ in ratings],
        "age": [bucket(users[u][1]) for u, _, _ in ratings],
        "gender": [users[u][2] for u, _, _ in ratings],
        "zip3": [users[u][4][:3] for u, _, _ in ratings],
        "release_year": [items[i][2] for _, i, _ in ratings],
        "genre": [min(items[i][3], key=GENRES.index) for _, i, _ in ratings],
    }
    for name, keys in expected.items():
        mapping = one_id_per_group(keys, ids[:, fields.index(name)])
        assert len(set(mapping.values())) == len(mapping), f"{name}: distinct values must get distinct ids"
    combo = load_dataset("movielens100k", data_dir=tmp_path / "gl", split=(1, 0, 0), genre="combination")
    mapping = one_id_per_group([tuple(sorted(items[i][3])) for _, i, _ in ratings], combo.train.ids[:, -1])
    assert len(set(mapping.values())) == len(mapping)


def test_movielens_bad_rating_reports_line(tmp_path):
    write_tiny_movielens(tmp_path / "gl", "grouplens", bad_rating_line=7)
    with pytest.raises(ValueError, match=r"u\.data: line 7: rating 'five'"):
        load_dataset("movielens100k", data_dir=tmp_path / "gl")
    data = load_dataset("movielens100k", data_dir=tmp_path / "gl", skip_bad_lines=True)
    assert data.info["skipped_lines"] == 1
    write_tiny_movielens(tmp_path / "rb", "recbole", bad_rating_line=9)
    with pytest.raises(ValueError, match=r"ml-100k\.inter: line 9"):
        load_dataset("movielens100k", data_dir=tmp_path / "rb")
    with pytest.raises(FileNotFoundError, match="u.data"):
        load_dataset("movielens100k", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# Criteo
# ----------------------------------------------------------------------------------------------

NUMERIC_POOL = ["", "0", "1", "2", "3", "7", "8", "20", "54", "55", "1000", "-1", "123456"]


def write_criteo(path, num_rows=600, seed=0, opener=open):
    """Rows in the Kaggle format plus the raw values, for independent checks."""
    rnd = random.Random(seed)
    rows = []
    for n in range(num_rows):
        label = "1" if rnd.random() < 0.3 else "0"
        numeric = [rnd.choice(NUMERIC_POOL) for _ in range(13)]
        categorical = [format(rnd.randrange(40) * 7919, "08x") for _ in range(26)]
        categorical[0] = "68fd1e64"                                        # in every row: kept
        categorical[1] = format(n, "08x") if n % 10 else ""                # unique per row -> OOV; '' frequent
        categorical[2] = f"rare{n % 100:04d}" if n < 500 else "0a0a0a0a"  # 5 times each -> OOV at min_count 10
        rows.append([label] + numeric + categorical)
    with opener(path, "wt") as f:
        f.write("".join("\t".join(r) + "\n" for r in rows))
    return rows


def test_criteo_reader(tmp_path):
    rows = write_criteo(tmp_path / "train.txt")
    data = load_dataset("criteo", data_dir=tmp_path, split=(1, 0, 0))
    assert_well_formed(data)
    assert data.schema.num_fields == 39
    assert data.schema.field_names == [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    assert len(data.train) == len(rows) and data.info["min_count"] == 10
    ids = data.train.ids
    np.testing.assert_array_equal(data.train.labels, [float(r[0]) for r in rows])
    # numeric fields: rows in the same bucket share an id, different buckets differ, missing is its own token
    for f in range(13):
        keys = ["missing" if r[1 + f] == "" else log2_bucket(int(r[1 + f])) for r in rows]
        mapping = one_id_per_group(keys, ids[:, f])
        assert len(set(mapping.values())) == len(mapping)
    assert log2_bucket(3) == log2_bucket(1) == 1 and log2_bucket(54) == 15 and log2_bucket(55) == 16
    # categorical fields with min_count 10
    oov = data.schema.oov_ids
    assert data.schema.field_dims[13] == 2 and (ids[:, 13] == 0).all()
    c2 = ids[:, 14]
    blank = np.array([r[15] == "" for r in rows])
    assert len(set(c2[blank])) == 1 and c2[blank][0] != oov[14] and (c2[~blank] == oov[14]).all()
    c3 = ids[:, 15]
    rare = np.array([r[16].startswith("rare") for r in rows])
    assert (c3[rare] == oov[15]).all() and (c3[~rare] != oov[15]).all()
    assert data.schema.field_dims[15] == 2


def test_criteo_split_gzip_and_max_rows(tmp_path):
    write_criteo(tmp_path / "train.txt")
    data = load_dataset("criteo", data_dir=tmp_path / "train.txt", min_count=1)
    sizes = [len(s) for s in data.splits().values()]
    assert sum(sizes) == 600
    assert all(abs(n - 600 * r / 10) <= 1 for n, r in zip(sizes, (7, 2, 1)))
    # values never seen in train map to OOV in valid/test: C2 holds a unique value per row
    assert (data.valid.ids[:, 14][data.valid.ids[:, 14] != 0] == data.schema.oov_ids[14]).all()
    (tmp_path / "gz").mkdir()
    write_criteo(tmp_path / "gz" / "train.txt.gz", opener=gzip.open)
    assert_same_data(data, load_dataset("criteo", data_dir=tmp_path / "gz", min_count=1))
    small = load_dataset("criteo", data_dir=tmp_path, max_rows=100, min_count=1)
    assert sum(len(s) for s in small.splits().values()) == 100


def test_gzip_without_its_name_and_a_bom(tmp_path):
    """Files as they arrive: gzip data named without ``.gz`` (Avazu's ``train``) is read by its magic bytes;
    a UTF-8 byte-order mark before a headerless file's first label is not part of it."""
    write_criteo(tmp_path / "train.txt", num_rows=200)
    reference = load_dataset("criteo", data_dir=tmp_path / "train.txt", cache_dir=False, min_count=1)
    (tmp_path / "gz").mkdir()
    write_criteo(tmp_path / "gz" / "train.txt", num_rows=200, opener=gzip.open)
    assert (tmp_path / "gz" / "train.txt").read_bytes()[:2] == b"\x1f\x8b"
    assert_same_data(reference, load_dataset("criteo", data_dir=tmp_path / "gz" / "train.txt", cache_dir=False,
                                             min_count=1))
    (tmp_path / "bom").mkdir()
    (tmp_path / "bom" / "train.txt").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "train.txt").read_bytes())
    assert_same_data(reference, load_dataset("criteo", data_dir=tmp_path / "bom" / "train.txt", cache_dir=False,
                                             min_count=1))


def test_a_failed_cache_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A cache write that fails midway (a full disk) is reported in info['cache_error'] and leaves nothing
    behind in the cache directory: no partial temp file, no schema without its arrays."""
    import errno

    from sfg_fast.data import common

    write_criteo(tmp_path / "train.txt", num_rows=120)

    def savez(fh, **arrays):
        fh.write(b"x" * 100000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common.np, "savez", savez)
    data = load_dataset("criteo", data_dir=tmp_path, min_count=1)
    assert "No space left" in data.info["cache_error"]
    assert sorted(os.listdir(tmp_path / ".sfg_cache")) == []
    monkeypatch.undo()
    assert load_dataset("criteo", data_dir=tmp_path, min_count=1).info["from_cache"] is False
    assert load_dataset("criteo", data_dir=tmp_path, min_count=1).info["from_cache"] is True


def test_criteo_chunking_line_endings_and_blank_lines(tmp_path):
    rows = write_criteo(tmp_path / "train.txt", num_rows=120)
    reference = load_dataset("criteo", data_dir=tmp_path, cache_dir=False, split=(1, 0, 0), min_count=2)
    lines = ["\t".join(r) for r in rows]
    (tmp_path / "crlf").mkdir()
    (tmp_path / "crlf" / "train.txt").write_bytes(
        ("\r\n".join(lines[:50]) + "\r\n\r\n" + "\r\n".join(lines[50:])).encode())  # no final newline
    for chunk_rows in (7, 50, 1000):
        data = load_dataset("criteo", data_dir=tmp_path / "crlf", cache_dir=False, split=(1, 0, 0), min_count=2,
                            chunk_rows=chunk_rows)
        assert_same_data(reference, data)
        assert data.info["blank_lines"] == 1 and data.info["skipped_lines"] == 0


def test_criteo_cache(tmp_path):
    write_criteo(tmp_path / "train.txt", num_rows=300)
    first = load_dataset("criteo", data_dir=tmp_path)
    assert first.info["from_cache"] is False
    cache = tmp_path / ".sfg_cache"
    assert any(p.suffix == ".npz" for p in cache.iterdir())
    second = load_dataset("criteo", data_dir=tmp_path)
    assert second.info["from_cache"] is True
    assert_same_data(first, second)
    assert second.info["rows"] == first.info["rows"]
    assert load_dataset("criteo", data_dir=tmp_path, min_count=3).info["from_cache"] is False
    assert load_dataset("criteo", data_dir=tmp_path, seed=1).info["from_cache"] is False
    # a changed file is read again
    write_criteo(tmp_path / "train.txt", num_rows=301)
    third = load_dataset("criteo", data_dir=tmp_path)
    assert third.info["from_cache"] is False and third.info["rows"] == 301
    # a touched file (same size, new mtime) is read again too
    stat = os.stat(tmp_path / "train.txt")
    os.utime(tmp_path / "train.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    assert load_dataset("criteo", data_dir=tmp_path).info["from_cache"] is False
    # explicit cache_dir, and no cache at all
    other = load_dataset("criteo", data_dir=tmp_path, cache_dir=tmp_path / "elsewhere")
    assert other.info["from_cache"] is False and (tmp_path / "elsewhere").is_dir()
    assert load_dataset("criteo", data_dir=tmp_path, cache_dir=tmp_path / "elsewhere").info["from_cache"] is True
    assert load_dataset("criteo", data_dir=tmp_path, cache_dir=False).info["from_cache"] is False


def test_cache_entries_a_changed_file_supersedes_are_removed(tmp_path):
    """One entry per file and option set: a rewrite of the file (or a new cache format) replaces its entry
    instead of leaving the old one on disk for ever; entries of other options stay."""
    cache = tmp_path / ".sfg_cache"
    write_criteo(tmp_path / "train.txt", num_rows=120)
    load_dataset("criteo", data_dir=tmp_path)
    load_dataset("criteo", data_dir=tmp_path, min_count=3)
    first = sorted(p.name for p in cache.glob("*.npz"))
    assert len(first) == 2 and len(list(cache.glob("*.source.json"))) == 2
    write_criteo(tmp_path / "train.txt", num_rows=121)           # the file changes
    data = load_dataset("criteo", data_dir=tmp_path)
    assert data.info["from_cache"] is False and data.info["rows"] == 121
    now = sorted(p.name for p in cache.glob("*.npz"))
    assert len(now) == 2 and len(set(now) & set(first)) == 1      # the min_count=3 entry stays
    assert [os.path.basename(p) for p in data.info["cache_removed"]] == sorted(set(first) - set(now))
    assert len(list(cache.glob("*.schema.json"))) == len(list(cache.glob("*.source.json"))) == 2
    assert load_dataset("criteo", data_dir=tmp_path).info["from_cache"] is True
    # an entry of another file in the same folder is never touched
    other = tmp_path / "other"
    other.mkdir()
    write_criteo(other / "train.txt", num_rows=50)
    load_dataset("criteo", data_dir=other, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 3


def test_criteo_bad_lines(tmp_path):
    rows = write_criteo(tmp_path / "train.txt", num_rows=50)
    lines = ["\t".join(r) for r in rows]
    lines[4] = "\t".join(rows[4][:-1])                  # line 5: 39 columns
    lines[6] = "\t".join(["x"] + rows[6][1:])           # line 7: non-numeric label
    lines[7] = "\t".join(["2"] + rows[7][1:])           # line 8: label not 0/1
    lines[8] = "\t".join(rows[8][:3] + ["abc"] + rows[8][4:])  # line 9: non-numeric I3
    lines.insert(20, "")                                # a blank line is no row and no error
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train\.txt: line 5: expected 40 columns"):
        load_dataset("criteo", data_dir=tmp_path, cache_dir=False)
    lines[4] = "\t".join(rows[4])
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train\.txt: line 7: .*label 'x' is not numeric"):
        load_dataset("criteo", data_dir=tmp_path, cache_dir=False)
    lines[4] = "\t".join(rows[4][:-1])
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    data = load_dataset("criteo", data_dir=tmp_path, cache_dir=False, skip_bad_lines=True, min_count=1)
    assert data.info["skipped_lines"] == 4
    assert sum(len(s) for s in data.splits().values()) == 46
    assert any(":9: column 'I3'" in e for e in data.info["skipped_examples"])
    lines[4] = "\t".join(rows[4])
    lines[6] = "\t".join(rows[6])
    lines[8] = "\t".join(rows[8])
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 8: .*label '2' is not 0 or 1"):
        load_dataset("criteo", data_dir=tmp_path, cache_dir=False)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_dataset("criteo", data_dir=tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train.txt"):
        load_dataset("criteo", data_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("criteo")


# ----------------------------------------------------------------------------------------------
# Avazu
# ----------------------------------------------------------------------------------------------

AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
                "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")


def write_avazu(path, num_rows=400, seed=1):
    rnd = random.Random(seed)
    days = ["141020", "141021", "141024", "141025", "141026", "141029"]   # Mon, Tue, Fri, Sat, Sun, Wed
    rows = []
    for n in range(num_rows):
        hour = rnd.choice(days) + f"{rnd.randrange(24):02d}"
        values = [str(10 ** 18 + n), "1" if rnd.random() < 0.2 else "0", hour]
        values += [format(rnd.randrange(6) * 31, "x") for _ in range(21)]
        values[12] = f"ip{n}"                       # device_ip: unique per row -> OOV at min_count 2
        values[11] = "" if n % 3 == 0 else "a99f214a"
        rows.append(values)
    with open(path, "w") as f:
        f.write(AVAZU_HEADER + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return rows


def test_avazu_reader(tmp_path):
    rows = write_avazu(tmp_path / "train.csv")
    data = load_dataset("avazu", data_dir=tmp_path, cache_dir=tmp_path / "cache", split=(1, 0, 0))
    assert_well_formed(data)
    names = data.schema.field_names
    assert data.schema.num_fields == 24 and "id" not in names and "click" not in names
    assert names[:3] == ["hour", "weekday", "is_weekend"]
    assert len(data.train) == len(rows) and data.info["min_count"] == 2
    np.testing.assert_array_equal(data.train.labels, [float(r[1]) for r in rows])
    ids = data.train.ids
    weekday = [datetime.date(2000 + int(r[2][:2]), int(r[2][2:4]), int(r[2][4:6])).isoweekday() for r in rows]
    for f, keys in enumerate([[r[2][6:] for r in rows], weekday, [w >= 6 for w in weekday]]):
        mapping = one_id_per_group(keys, ids[:, f])
        assert len(set(mapping.values())) == len(mapping)
    assert data.schema.field_dims[1] == 7 and data.schema.field_dims[2] == 3
    ip = names.index("device_ip")
    assert data.schema.field_dims[ip] == 1 and (ids[:, ip] == 0).all()
    device_id = names.index("device_id")
    one_id_per_group([r[11] for r in rows], ids[:, device_id])
    again = load_dataset("avazu", data_dir=tmp_path, cache_dir=tmp_path / "cache", split=(1, 0, 0))
    assert again.info["from_cache"] is True
    assert_same_data(data, again)
    default = load_dataset("avazu", data_dir=tmp_path / "train.csv", cache_dir=False)
    assert [len(s) for s in default.splits().values()] == [320, 40, 40]


def test_avazu_bad_input(tmp_path):
    rows = write_avazu(tmp_path / "train", num_rows=30)
    lines = [AVAZU_HEADER] + [",".join(r) for r in rows]
    lines[5] = ",".join(rows[4][:2] + ["14023100"] + rows[4][3:])   # line 6: no 31 February
    lines[9] = ",".join(rows[8][:2] + ["1410210"] + rows[8][3:])    # line 10: 7 digits
    (tmp_path / "train").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train: line 6: column 'hour'"):
        load_dataset("avazu", data_dir=tmp_path, cache_dir=False)
    data = load_dataset("avazu", data_dir=tmp_path, cache_dir=False, skip_bad_lines=True)
    assert data.info["skipped_lines"] == 2 and data.info["rows"] == 28
    (tmp_path / "train").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"line 1: expected the header"):
        load_dataset("avazu", data_dir=tmp_path, cache_dir=False, skip_bad_lines=True)


# ----------------------------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------------------------

def auc(labels, scores):
    """Rank-sum AUC, independent of the code under test."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tie = scores == value
        ranks[tie] = ranks[tie].mean()
    positives = labels == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return (ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def test_generate_deterministic_skewed_and_learnable():
    ids, labels, model = synthetic.generate([50] * 6, 5000, seed=3, return_model=True)
    assert ids.shape == (5000, 6) and ids.dtype == np.int64 and labels.dtype == np.float32
    assert ids.min() >= 0 and ids.max() < 50
    again_ids, again_labels = synthetic.generate([50] * 6, 5000, seed=3)
    np.testing.assert_array_equal(ids, again_ids)
    np.testing.assert_array_equal(labels, again_labels)
    assert not np.array_equal(ids, synthetic.generate([50] * 6, 5000, seed=4)[0])
    assert 0.15 < labels.mean() < 0.35
    # Zipf: the hottest id of a field is far above the uniform share 1/50
    assert Counter(ids[:, 0].tolist()).most_common(1)[0][1] / 5000 > 5 / 50
    # the planted model ranks clicks well, and its pairwise part alone carries signal
    logits = model.logits(ids)
    assert auc(labels, logits) > 0.7
    linear = sum(w[ids[:, f]] for f, w in enumerate(model.weights))
    assert auc(labels, logits - linear) > 0.6
    with pytest.raises(ValueError, match="field_dims"):
        synthetic.generate([], 10)
    with pytest.raises(ValueError, match="zipf_a"):
        synthetic.generate([5], 10, zipf_a=-1)


def test_synthetic_datasets_load_and_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder

    data = load_dataset("synthetic-avazu", num_rows=6000, seed=11)
    assert_well_formed(data)
    assert data.schema.num_fields == 24 and data.schema.name == "synthetic-avazu"
    assert [len(s) for s in data.splits().values()] == [4800, 600, 600]
    assert_same_data(data, load_dataset("synthetic-avazu", num_rows=6000, seed=11))
    assert 0.15 < data.train.labels.mean() < 0.35
    encoder = OneHotEncoder(handle_unknown="ignore").fit(data.train.ids)
    model = LogisticRegression(C=0.3, max_iter=300).fit(encoder.transform(data.train.ids), data.train.labels)
    scores = model.decision_function(encoder.transform(np.concatenate([data.valid.ids, data.test.ids])))
    assert auc(np.concatenate([data.valid.labels, data.test.labels]), scores) > 0.6

    criteo = load_dataset("synthetic-criteo", num_rows=3000, seed=2, vocab_scale=0.5)
    assert_well_formed(criteo)
    assert criteo.schema.num_fields == 39
    bigger = load_dataset("synthetic-criteo", num_rows=3000, seed=2, vocab_scale=0.7)
    assert sum(bigger.info["generator"]["field_dims"]) > sum(criteo.info["generator"]["field_dims"])
    assert load_dataset("synthetic-criteo", num_rows=5000, max_rows=1000).info["rows"] == 1000


def test_movielens_without_recbole_says_how_to_get_it(monkeypatch):
    from sfg_fast.data import movielens as ml
    monkeypatch.setattr(ml.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps recbole==1\.2\.1.*data_dir"):
        load_dataset("movielens100k")


def test_min_count_counts_train_rows_only(tmp_path):
    # A value rare in train but frequent in valid must map to OOV: its valid/test occurrences may
    # not lift it over min_count (that would leak held-out rows into the vocabulary).
    from sfg_fast.data.common import split_assignment

    num_rows, seed = 80, 5
    where = split_assignment(num_rows, (1, 1, 0), seed)
    first_train = int(np.flatnonzero(where == 0)[0])
    lines = []
    for i in range(num_rows):
        value = "hot" if (where[i] == 1 or i == first_train) else "common"
        label = str(i % 2)
        lines.append("\t".join([label] + ["1"] * 13 + [value] + ["x"] * 25))
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    data = load_dataset("criteo", data_dir=tmp_path, cache_dir=False, seed=seed, split=(1, 1, 0), min_count=2)
    assert (where == 1).sum() >= 2  # 'hot' is frequent overall, seen once in train
    c1 = data.schema.field_names.index("C1")
    oov = data.schema.oov_ids[c1]
    assert data.schema.field_dims[c1] == 2  # 'common' and the OOV id, nothing for 'hot'
    assert (data.valid.ids[:, c1] == oov).all()
    assert (data.train.ids[:, c1] == oov).sum() == 1 and (data.train.ids[:, c1] == 0).sum() == len(data.train) - 1


def test_criteo_stray_carriage_returns_never_drop_rows(tmp_path):
    """Lines end at LF only, where the row count is taken: a line ending CR CR LF (a file converted to
    CRLF twice) keeps every row; a bare CR inside a field stays in that field's token; a file with
    CR-only line endings is a clear error, not one silently read row."""
    rows = write_criteo(tmp_path / "train.txt", num_rows=50)
    reference = load_dataset("criteo", data_dir=tmp_path, cache_dir=False, split=(1, 0, 0), min_count=1)
    lines = ["\t".join(r) for r in rows]
    for name, text in (("double-cr", "\r\n".join(lines[:20]) + "\r\r\n" + "\r\n".join(lines[20:]) + "\r\n"),
                       ("cr-in-field", "\n".join(lines[:9]) + "\n" + lines[9][:-2] + "\r" + lines[9][-2:] + "\n"
                        + "\n".join(lines[10:]) + "\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.txt").write_bytes(text.encode())
        for chunk_rows in (7, 1000):
            data = load_dataset("criteo", data_dir=tmp_path / name, cache_dir=False, split=(1, 0, 0), min_count=1,
                                chunk_rows=chunk_rows)
            assert len(data.train) == 50 and data.info["skipped_lines"] == 0, (name, chunk_rows)
            np.testing.assert_array_equal(data.train.labels, reference.train.labels)
            if name == "double-cr":
                assert_same_data(reference, data)
    (tmp_path / "cr-only").mkdir()
    (tmp_path / "cr-only" / "train.txt").write_bytes("\r".join(lines).encode())
    with pytest.raises(ValueError, match="bare CR"):
        load_dataset("criteo", data_dir=tmp_path / "cr-only", cache_dir=False)


def test_cache_sees_a_rewrite_that_restores_the_mtime_and_survives_corruption(tmp_path):
    rows = write_criteo(tmp_path / "train.txt", num_rows=200)
    path = tmp_path / "train.txt"
    first = load_dataset("criteo", data_dir=tmp_path, min_count=1)
    stat = os.stat(path)
    flipped = ["\t".join(["1" if r[0] == "0" else "0"] + r[1:]) for r in rows]      # same size, new labels
    path.write_bytes(("\n".join(flipped) + "\n").encode())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))                          # as cp -p / rsync -t do
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    second = load_dataset("criteo", data_dir=tmp_path, min_count=1)
    assert second.info["from_cache"] is False
    np.testing.assert_array_equal(second.train.labels, 1 - first.train.labels)
    # a truncated cache entry is a miss: read again and re-cached, never a traceback
    for entry in (tmp_path / ".sfg_cache").iterdir():
        if entry.suffix == ".npz":
            entry.write_bytes(entry.read_bytes()[:100])
    third = load_dataset("criteo", data_dir=tmp_path, min_count=1)
    assert third.info["from_cache"] is False
    assert_same_data(second, third)
    assert load_dataset("criteo", data_dir=tmp_path, min_count=1).info["from_cache"] is True


def test_avazu_header_with_a_byte_order_mark_or_trailing_blanks(tmp_path):
    write_avazu(tmp_path / "train.csv", num_rows=60)
    reference = load_dataset("avazu", data_dir=tmp_path, cache_dir=False, split=(1, 0, 0))
    text = (tmp_path / "train.csv").read_bytes()
    for name, data in (("bom", b"\xef\xbb\xbf" + text), ("blank", text.replace(b"\n", b" \t\n", 1))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.csv").write_bytes(data)
        assert_same_data(reference, load_dataset("avazu", data_dir=tmp_path / name, cache_dir=False, split=(1, 0, 0)))
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "train.csv").write_bytes(text.replace(b"click", b"clicks", 1))
    with pytest.raises(ValueError, match="header"):
        load_dataset("avazu", data_dir=tmp_path / "wrong", cache_dir=False)


# ----------------------------------------------------------------------------------------------
# feature maps: encoding new data with a run's vocabularies
# ----------------------------------------------------------------------------------------------

def _file_order_ids(data: CTRData, seed: int, split=(7, 2, 1)):
    """The rows of all three splits back in file order (splits keep file order within themselves)."""
    from sfg_fast.data.common import split_assignment
    n = sum(len(s) for s in data.splits().values())
    where = split_assignment(n, split, seed)
    ids = np.empty((n, data.schema.num_fields), np.int64)
    labels = np.empty(n, np.float32)
    for s, part in enumerate(data.splits().values()):
        ids[where == s], labels[where == s] = part.ids, part.labels
    return ids, labels


@pytest.mark.parametrize("name", ["criteo", "avazu", "movielens100k"])
def test_vocabularies_reencode_the_training_file_exactly(tmp_path, name):
    """Encoding the training file again with the saved feature map gives every row the id it trained with;
    a token the run did not keep (rare, or new) gets the field's OOV id."""
    from sfg_fast.data import load_feature_map, save_feature_map
    if name == "criteo":
        write_criteo(tmp_path / "train.txt", num_rows=300)
        kw, split = dict(data_dir=tmp_path, min_count=3), (7, 2, 1)
    elif name == "avazu":
        write_avazu(tmp_path / "train.csv", num_rows=300)
        kw, split = dict(data_dir=tmp_path / "train.csv"), (8, 1, 1)
    else:
        write_tiny_movielens(tmp_path, "grouplens")
        kw, split = dict(data_dir=tmp_path, min_count=2), (8, 1, 1)
    data = load_dataset(name, seed=5, **kw)
    assert data.vocabularies is not None and [len(v) + 1 for v in data.vocabularies] == data.schema.field_dims
    # cached and re-read data carry the same vocabularies
    if name != "movielens100k":
        assert load_dataset(name, seed=5, **kw).vocabularies == data.vocabularies
    fm = save_feature_map(data, str(tmp_path / "fm.json.gz"))
    assert load_feature_map(str(tmp_path / "fm.json.gz"), dataset=name) == fm
    again = load_dataset(name, seed=0, split=(1, 0, 0), vocabularies=fm["vocabularies"],
                         **{k: v for k, v in kw.items() if k != "min_count"})
    assert again.schema.field_dims == data.schema.field_dims and again.info["from_cache"] is False
    assert data.source_lines is None and len(again.source_lines[0]) == len(again.train)
    assert (np.diff(again.source_lines[0]) > 0).all() and again.source_lines[0][0] >= 1
    ids, labels = _file_order_ids(data, 5, split)
    np.testing.assert_array_equal(again.train.ids, ids)
    np.testing.assert_array_equal(again.train.labels, labels)
    assert len(again.valid) == len(again.test) == 0
    # every token -> its position in the vocabulary, anything else -> OOV: a vocabulary with one token
    # dropped sends exactly that token's rows to OOV and moves nothing else
    f = next(f for f, v in enumerate(fm["vocabularies"]) if len(v) >= 2)
    vocabs = [list(v) for v in fm["vocabularies"]]
    dropped = vocabs[f].pop(0)
    narrowed = load_dataset(name, seed=0, split=(1, 0, 0), vocabularies=vocabs,
                            **{k: v for k, v in kw.items() if k != "min_count"})
    oov = len(vocabs[f])
    want = np.where(ids[:, f] == 0, oov, ids[:, f] - 1)
    np.testing.assert_array_equal(narrowed.train.ids[:, f], want)
    assert dropped not in vocabs[f]


def test_feature_map_errors(tmp_path):
    import json
    from sfg_fast.data import load_feature_map, save_feature_map
    write_criteo(tmp_path / "train.txt", num_rows=100)
    data = load_dataset("criteo", data_dir=tmp_path, cache_dir=False)
    path = str(tmp_path / "fm.json.gz")
    fm = save_feature_map(data, path)
    with pytest.raises(ValueError, match="not 'avazu'"):
        load_feature_map(path, dataset="avazu")
    with pytest.raises(FileNotFoundError):
        load_feature_map(str(tmp_path / "missing.json.gz"))
    (tmp_path / "torn.json.gz").write_bytes(open(path, "rb").read()[:50])
    with pytest.raises(ValueError, match="could not be read"):
        load_feature_map(str(tmp_path / "torn.json.gz"))
    for corrupt, match in ((dict(fm, field_dims=[d + 1 for d in fm["field_dims"]]), "OOV id"),
                           (dict(fm, vocabularies=[v + v[:1] if v else ["x", "x"] for v in fm["vocabularies"]]),
                            "field_dims|repeats"),
                           (dict(fm, format="other"), "not an sfg_fast feature map")):
        bad = tmp_path / "bad.json.gz"
        bad.write_bytes(gzip.compress(json.dumps(corrupt).encode()))
        with pytest.raises(ValueError, match=match):
            load_feature_map(str(bad))
    with pytest.raises(ValueError, match="vocabularies holds"):
        load_dataset("criteo", data_dir=tmp_path, vocabularies=fm["vocabularies"][:-1])
    with pytest.raises(ValueError, match="generated"):
        load_dataset("synthetic-criteo", num_rows=100, vocabularies=fm["vocabularies"])
    with pytest.raises(ValueError, match="no vocabularies"):
        save_feature_map(load_dataset("synthetic-criteo", num_rows=100), path)


def test_a_feature_map_brings_its_own_preprocessing(tmp_path):
    from sfg_fast.data.feature_map import feature_map_of
    write_tiny_movielens(tmp_path, "grouplens")
    data = load_dataset("movielens100k", data_dir=tmp_path, genre="combination")
    fm = feature_map_of(data)
    assert fm["preprocessing"]["genre"] == "combination"
    again = load_dataset("movielens100k", data_dir=tmp_path, split=(1, 0, 0), vocabularies=fm)   # genre from fm
    ids, _ = _file_order_ids(data, 2018, (8, 1, 1))
    np.testing.assert_array_equal(again.train.ids, ids)
    with pytest.raises(ValueError, match="genre='first' conflicts"):
        load_dataset("movielens100k", data_dir=tmp_path, split=(1, 0, 0), vocabularies=fm, genre="first")
    with pytest.raises(ValueError, match="not 'criteo'"):
        load_dataset("criteo", data_dir=tmp_path, vocabularies=fm)


def test_unlabelled_criteo_lines_encode_like_their_labelled_twins(tmp_path):
    """Kaggle's Criteo test.txt has no label column: read with labeled=False and the run's vocabularies, each
    line gets the ids its labelled twin gets, and a NaN label."""
    from sfg_fast.data.feature_map import feature_map_of
    rows = write_criteo(tmp_path / "train.txt", num_rows=200)
    data = load_dataset("criteo", data_dir=tmp_path, cache_dir=False, min_count=2)
    fm = feature_map_of(data)
    (tmp_path / "test.txt").write_text("".join("\t".join(r[1:]) + "\n" for r in rows))
    scored = load_dataset("criteo", data_dir=tmp_path / "test.txt", split=(1, 0, 0), vocabularies=fm, labeled=False)
    labelled = load_dataset("criteo", data_dir=tmp_path / "train.txt", split=(1, 0, 0), vocabularies=fm)
    np.testing.assert_array_equal(scored.train.ids, labelled.train.ids)
    assert np.isnan(scored.train.labels).all() and len(scored.train) == 200
    with pytest.raises(ValueError, match="pass vocabularies="):
        load_dataset("criteo", data_dir=tmp_path / "test.txt", labeled=False)
    with pytest.raises(ValueError, match="no unlabelled format"):
        load_dataset("movielens100k", labeled=False, vocabularies=fm["vocabularies"])


def test_files_with_no_rows_are_an_error_naming_the_file(tmp_path):
    """An empty file, a header alone, or only bad lines skipped: a clear error, not 0-row splits."""
    cases = {"empty": b"", "newline": b"\n"}
    for name, content in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.txt").write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}.train\.txt: no data rows"):
            load_dataset("criteo", data_dir=tmp_path / name, cache_dir=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.txt").write_text("x\ty\n1\t2\n")
    with pytest.raises(ValueError, match=r"no data rows: all 2 malformed lines were skipped"):
        load_dataset("criteo", data_dir=tmp_path / "bad", cache_dir=False, skip_bad_lines=True)
    write_criteo(tmp_path / "train.txt", num_rows=20)
    with pytest.raises(ValueError, match="max_rows=0"):
        load_dataset("criteo", data_dir=tmp_path, cache_dir=False, max_rows=0)
    (tmp_path / "avazu").mkdir()
    (tmp_path / "avazu" / "train.csv").write_text(AVAZU_HEADER + "\n")
    with pytest.raises(ValueError, match=r"train\.csv: no data rows: the file holds no data lines"):
        load_dataset("avazu", data_dir=tmp_path / "avazu", cache_dir=False)
    (tmp_path / "ml").mkdir()
    write_tiny_movielens(tmp_path / "ml", "grouplens")
    (tmp_path / "ml" / "u.data").write_text("")
    with pytest.raises(ValueError, match=r"u\.data: no data rows"):
        load_dataset("movielens100k", data_dir=tmp_path / "ml")


def test_damaged_gzip_files_are_an_error_naming_the_file(tmp_path):
    write_criteo(tmp_path / "train.txt", num_rows=300)
    packed = gzip.compress((tmp_path / "train.txt").read_bytes())
    os.remove(tmp_path / "train.txt")
    corrupt = bytearray(packed)
    corrupt[len(corrupt) // 2] ^= 0xFF
    for name, data in (("truncated", packed[:len(packed) // 2]), ("corrupt", bytes(corrupt))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.txt.gz").write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name}.train\.txt\.gz: the gzip data is damaged or truncated"):
            load_dataset("criteo", data_dir=tmp_path / name, cache_dir=False)


def test_tokens_are_utf8_and_other_bytes_stay_distinct(tmp_path):
    """Tokens decode as UTF-8 (a user's vocabulary list with 'café' matches the file's café); bytes that are
    not UTF-8 never fail and never merge: two such values stay two tokens, through a feature map too."""
    import json
    from sfg_fast.data import load_feature_map, save_feature_map
    rows = write_criteo(tmp_path / "train.txt", num_rows=40)
    lines = ["\t".join(r).encode() for r in rows]
    c1, field = 14, 13                                       # C1: column 14 of the file, field 13
    for n, line in enumerate(lines):
        cols = line.split(b"\t")
        cols[c1] = ("café" if n % 4 == 0 else "naïve").encode() if n % 2 == 0 else (b"\xff" if n % 3 else b"\xfe")
        lines[n] = b"\t".join(cols)
    (tmp_path / "train.txt").write_bytes(b"\n".join(lines) + b"\n")
    data = load_dataset("criteo", data_dir=tmp_path, cache_dir=False, min_count=1, split=(1, 0, 0))
    vocab = data.vocabularies[field]
    assert {"café", "naïve"} <= set(vocab) and len(vocab) == 4, vocab
    assert data.info["encoding"] == "utf-8"
    mine = load_dataset("criteo", data_dir=tmp_path, cache_dir=False, split=(1, 0, 0),
                        vocabularies=[["café"] if f == field else list(v) for f, v in enumerate(data.vocabularies)])
    np.testing.assert_array_equal(mine.train.ids[:, field] == 0, data.train.ids[:, field] == vocab.index("café"))
    assert (mine.train.ids[:, field] == 0).sum() == 10        # rows 0, 4, 8, ...: café
    path = str(tmp_path / "fm.json.gz")
    fm = save_feature_map(data, path)
    assert fm["preprocessing"]["encoding"] == "utf-8"
    again = load_dataset("criteo", data_dir=tmp_path, cache_dir=False, split=(1, 0, 0),
                         vocabularies=load_feature_map(path))
    np.testing.assert_array_equal(again.train.ids, data.train.ids)
    # a feature map written before the encoding was recorded holds latin-1 decoded tokens: files are
    # decoded that way for it, so its runs keep their ids
    legacy = json.loads(json.dumps(fm))
    del legacy["preprocessing"]["encoding"]
    legacy["vocabularies"][field] = [t.encode("utf-8", "surrogateescape").decode("latin-1") for t in vocab]
    old = load_dataset("criteo", data_dir=tmp_path, cache_dir=False, split=(1, 0, 0), vocabularies=legacy)
    np.testing.assert_array_equal(old.train.ids, data.train.ids)


def test_crlf_lines_get_no_bare_cr_hint_and_digit_grouping_is_not_a_number(tmp_path):
    rows = write_criteo(tmp_path / "train.txt", num_rows=10)
    lines = ["\t".join(r) for r in rows]
    lines[3] = "\t".join(rows[3][:-1])                       # 39 columns
    (tmp_path / "train.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    with pytest.raises(ValueError, match=r"line 4: expected 40 columns separated by '\\t', found 39") as caught:
        load_dataset("criteo", data_dir=tmp_path, cache_dir=False)
    assert "bare CR" not in str(caught.value)
    lines[3] = "\t".join(rows[3][:1] + ["1_0"] + rows[3][2:])
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 4: column 'I1': '1_0' is not a number"):
        load_dataset("criteo", data_dir=tmp_path, cache_dir=False)


def test_labels_and_counts_are_ascii_numbers(tmp_path):
    """float() and int() take digit grouping and other scripts' digits; a log's label or count does not."""
    rows = write_criteo(tmp_path / "train.txt", num_rows=10)
    for bad, where in (("0_1", 0), ("１", 0), ("５", 1)):
        lines = ["\t".join(r) for r in rows]
        lines[2] = "\t".join(rows[2][:where] + [bad] + rows[2][where + 1:])
        (tmp_path / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=r"line 3: .*is not (numeric|a number)"):
            load_dataset("criteo", data_dir=tmp_path, cache_dir=False)


def test_a_new_cache_format_removes_the_entries_of_the_older_one(tmp_path):
    """An entry of cache format 3 (before the text encoding was an option) is superseded by the same file
    and options read again: it is deleted, not left on disk for good."""
    import glob
    import json
    write_criteo(tmp_path / "train.txt", num_rows=60)
    cache = tmp_path / "c"
    load_dataset("criteo", data_dir=tmp_path, cache_dir=cache)
    src = glob.glob(str(cache / "*.source.json"))[0]
    record = json.loads(open(src).read())
    record["cache_format"] = 3
    del record["options"]["encoding"]
    stem = src[:-len(".source.json")]
    old = stem.replace("criteo-", "criteo-old")
    for ext in (".npz", ".schema.json"):
        os.rename(stem + ext, old + ext)
    with open(old + ".source.json", "w") as f:
        json.dump(record, f)
    os.remove(src)
    again = load_dataset("criteo", data_dir=tmp_path, cache_dir=cache)
    assert again.info["cache_removed"] == [old + ".npz"]
    assert not glob.glob(old + "*")


def test_a_relinked_path_leaves_no_cache_entry_behind(tmp_path):
    """A `train.txt -> day-N.txt` link re-pointed each day kept every day's entry (the record compared the
    resolved file only). An entry of a file out of reach for now (an unmounted drive, another machine's path
    to a shared cache) stays."""
    days, link_dir = tmp_path / "days", tmp_path / "latest"
    days.mkdir()
    link_dir.mkdir()
    cache = link_dir / ".sfg_cache"
    for day in (1, 2, 3):
        write_criteo(days / f"day{day}.txt", num_rows=60 + day)
        link = link_dir / "train.txt"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(days / f"day{day}.txt")
        data = load_dataset("criteo", data_dir=link_dir)
        assert data.info["from_cache"] is False and data.info["rows"] == 60 + day
        assert len(list(cache.glob("*.npz"))) == len(list(cache.glob("*.source.json"))) == 1, day
    # another file, cached here, then out of reach while a third file's entry is written
    drive = tmp_path / "drive"
    drive.mkdir()
    write_criteo(drive / "train.txt", num_rows=70)
    load_dataset("criteo", data_dir=drive, cache_dir=cache)
    os.rename(drive, tmp_path / "unmounted")
    write_criteo(days / "day4.txt", num_rows=64)
    load_dataset("criteo", data_dir=days / "day4.txt", cache_dir=cache)
    os.rename(tmp_path / "unmounted", drive)
    assert load_dataset("criteo", data_dir=drive, cache_dir=cache).info["from_cache"] is True


def test_an_entry_killed_before_its_schema_is_still_superseded(tmp_path, monkeypatch):
    """The source record used to be written last: an entry whose writer was killed after its arrays had none,
    so a new version of the file never removed it (a full-size .npz for good). The record now comes first."""
    from sfg_fast.data import common

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed
    write_criteo(tmp_path / "train.txt", num_rows=80)
    cache = tmp_path / ".sfg_cache"
    monkeypatch.setattr(common.Schema, "save_json", killed)     # killed between the arrays and the schema
    with pytest.raises(Killed):
        load_dataset("criteo", data_dir=tmp_path)
    monkeypatch.undo()
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob("*.schema.json"))
    write_criteo(tmp_path / "train.txt", num_rows=81)
    data = load_dataset("criteo", data_dir=tmp_path)
    assert data.info["rows"] == 81 and len(data.info["cache_removed"]) == 1
    assert len(list(cache.glob("*.npz"))) == len(list(cache.glob("*.source.json"))) == 1


def test_temp_files_of_killed_cache_writes_are_removed_once_stale(tmp_path):
    """SIGKILL mid-write left `.criteo-<key>.npz.<random>.tmp` (as large as the entry) in the cache for good.
    The next entry written there removes those untouched for an hour; a younger one may be another
    process's write in progress and stays."""
    import time
    write_criteo(tmp_path / "train.txt", num_rows=50)
    cache = tmp_path / ".sfg_cache"
    cache.mkdir()
    old, young, foreign = (cache / ".criteo-0123.npz.abcd.tmp", cache / ".criteo-4567.npz.efgh.tmp",
                           cache / ".avazu-89ab.npz.ijkl.tmp")
    for path in (old, young, foreign):
        path.write_bytes(b"partial")
    hours_ago = time.time() - 7200
    os.utime(old, (hours_ago, hours_ago))
    os.utime(foreign, (hours_ago, hours_ago))
    load_dataset("criteo", data_dir=tmp_path)
    assert not old.exists() and young.exists() and foreign.exists()


def test_a_record_pruned_by_another_writer_meanwhile_is_written_again(tmp_path, monkeypatch):
    """Two processes caching the same path at once: the one finishing first prunes the other's record while
    that one still writes its arrays, which then had no record and could never be pruned. The record is
    written again once the entry is complete."""
    from sfg_fast.data import common
    write_criteo(tmp_path / "train.txt", num_rows=40)
    cache = tmp_path / ".sfg_cache"
    real = common.atomic_write

    def pruned_meanwhile(path, write):
        if path.endswith(".npz"):
            for record in cache.glob("*.source.json"):      # the other process's prune
                record.unlink()
        return real(path, write)
    monkeypatch.setattr(common, "atomic_write", pruned_meanwhile)
    load_dataset("criteo", data_dir=tmp_path)
    assert len(list(cache.glob("*.npz"))) == len(list(cache.glob("*.source.json"))) == 1
