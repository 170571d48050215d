"""MovieLens-100K source: atomic-file parsing, replay order, fetch atomicity, and the real data."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from streaming.events import Click, Impression, Item, UserProfile, decode, encode
from streaming.sources.movielens import DATASET_FILES, FetchError, MovieLens100K, fetch, is_complete

REPO = Path(__file__).resolve().parents[1]

# A tiny dataset in RecBole's atomic format. User 2 has no age, user 3's row stops before its
# zip code; item 20's title has a comma, quotes and a non-ASCII letter; item 30's year is the
# dataset's own typo "unkonwn"; item 40 has year "V", no genre and no rating.
USERS = (
    "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    "1\t24\tM\ttechnician\t85711\n"
    "2\t\tF\tother\tT8H1N\n"
    "3\t60\tF\tretired\n"
)
ITEMS = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "10\tToy Story\t1995\tAnimation Children's Comedy\n"
    '20\tMisérables, Les "Quoted"\t1995\tDrama Musical\n'
    "30\tunkonwn\tunkonwn\tunknown\n"
    "40\tNever Rated\tV\t\n"
)
# File order is not time order; the two ratings at t=200 must keep this order (user 1, then 3).
RATINGS = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "1\t20\t5\t300\n"
    "2\t10\t2\t100\n"
    "1\t10\t4\t200\n"
    "3\t30\t3\t200\n"
    "2\t20\t1\t400\n"
)


def write_dataset(root: Path, users: str = USERS, items: str = ITEMS, ratings: str = RATINGS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ml-100k.user").write_text(users, encoding="utf-8")
    (root / "ml-100k.item").write_text(items, encoding="utf-8")
    (root / "ml-100k.inter").write_text(ratings, encoding="utf-8")
    return root


@pytest.fixture
def tiny(tmp_path: Path) -> MovieLens100K:
    return MovieLens100K(write_dataset(tmp_path / "ml-100k"))


def test_ratings_are_sorted_by_time_with_ties_in_file_order(tiny: MovieLens100K) -> None:
    r = tiny.ratings()
    # Stable sort of (300, 100, 200, 200, 400): file rows 2, 3, 4, 1, 5.
    assert r["ts"].tolist() == [100, 200, 200, 300, 400]
    assert r["user_id"].tolist() == [2, 1, 3, 1, 2]
    assert r["item_id"].tolist() == [10, 10, 30, 20, 20]
    assert r["rating"].tolist() == [2.0, 4.0, 3.0, 5.0, 1.0]
    assert not r.flags.writeable


def test_users_keep_only_present_fields(tiny: MovieLens100K) -> None:
    # ts_ms = each user's first rating: u1 at 200 s, u2 at 100 s, u3 at 200 s.
    assert tiny.users() == [
        UserProfile(
            "u1",
            discrete={"gender": "M", "occupation": "technician", "zip_prefix": "8", "age_bucket": "18-24"},
            numeric={"age": 24.0},
            ts_ms=200_000,
        ),
        UserProfile("u2", discrete={"gender": "F", "occupation": "other", "zip_prefix": "T"}, ts_ms=100_000),
        UserProfile(
            "u3",
            discrete={"gender": "F", "occupation": "retired", "age_bucket": "56+"},
            numeric={"age": 60.0},
            ts_ms=200_000,
        ),
    ]


def test_items_take_genres_as_category_and_tags(tiny: MovieLens100K) -> None:
    # created_ms = first rating of the item: i10 at 100 s, i20 at 300 s, i30 at 200 s; i40 was never
    # rated and falls back to the dataset's first rating, 100 s.
    assert tiny.items() == [
        Item("i10", "Animation", ("Animation", "Children's", "Comedy"), {"release_year": 1995.0}, 100_000, 100_000),
        Item("i20", "Drama", ("Drama", "Musical"), {"release_year": 1995.0}, 300_000, 300_000),
        Item("i30", "unknown", ("unknown",), {}, 200_000, 200_000),
        Item("i40", "unknown", (), {}, 100_000, 100_000),
    ]
    assert tiny.titles()["i20"] == 'Misérables, Les "Quoted"'


def test_events_replay_profiles_then_impression_click_pairs(tiny: MovieLens100K) -> None:
    events = list(tiny.events())
    assert [type(e) for e in events[:7]] == [UserProfile] * 3 + [Item] * 4
    # Profiles and catalogue are stamped with the first rating's time (100 s); created_ms is kept.
    assert {e.ts_ms for e in events[:7]} == {100_000}
    assert [e.created_ms for e in events[3:7]] == [100_000, 300_000, 200_000, 100_000]
    pairs = events[7:]
    expected = [(2, 10, 100), (1, 10, 200), (3, 30, 200), (1, 20, 300), (2, 20, 400)]
    assert len(pairs) == 2 * len(expected)
    for (user, item, ts), impression, click in zip(expected, pairs[0::2], pairs[1::2], strict=True):
        request = f"ml-{user}-{item}-{ts}"
        assert impression == Impression(f"u{user}", f"i{item}", request, 0, ts * 1000)
        assert click == Click(f"u{user}", f"i{item}", request, ts * 1000)
    times = [e.ts_ms for e in events]
    assert times == sorted(times)
    for e in events:
        assert decode(encode(e)) == e


def test_min_rating_drops_low_ratings_and_their_impressions(tiny: MovieLens100K) -> None:
    # Ratings >= 3: (u1, i10, 4), (u3, i30, 3), (u1, i20, 5); the 2 and the 1 go, profiles stay.
    events = list(tiny.events(min_rating=3))
    assert len(events) == 7 + 6
    clicks = [(e.user_id, e.item_id) for e in events if isinstance(e, Click)]
    shown = [(e.user_id, e.item_id) for e in events if isinstance(e, Impression)]
    assert clicks == shown == [("u1", "i10"), ("u3", "i30"), ("u1", "i20")]


def test_malformed_files_name_the_line(tmp_path: Path) -> None:
    bad_number = RATINGS + "1\t10\tfive\t500\n"  # header is line 1, so this is line 7
    with pytest.raises(ValueError, match=r"ml-100k.inter:7: column rating:float expected a number, got 'five'"):
        MovieLens100K(write_dataset(tmp_path / "a", ratings=bad_number))
    too_many = RATINGS + "1\t10\t5\t500\textra\n"
    with pytest.raises(ValueError, match=r"ml-100k.inter:7: expected 4 tab-separated fields, got 5"):
        MovieLens100K(write_dataset(tmp_path / "b", ratings=too_many))
    untyped = ITEMS.replace("class:token_seq", "class")
    with pytest.raises(ValueError, match=r"header field 'class' is not name:type"):
        MovieLens100K(write_dataset(tmp_path / "c", items=untyped))


def test_partial_directory_is_not_complete(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ml-100k")
    assert is_complete(root)
    (root / "ml-100k.item").write_bytes(b"")
    assert not is_complete(root)  # an empty file is as good as none
    (root / "ml-100k.item").unlink()
    (root / "ml-100k.user").unlink()
    assert not is_complete(root)
    with pytest.raises(FileNotFoundError, match="run fetch"):
        MovieLens100K(root)


def test_fetch_returns_a_complete_directory_untouched(tmp_path: Path) -> None:
    # Complete by the file check, though not the real data: fetch must not download or rewrite it.
    root = write_dataset(tmp_path / "ml-100k")
    assert fetch(tmp_path, wheel=tmp_path / "does-not-exist.whl") == root
    assert (root / "ml-100k.user").read_text(encoding="utf-8") == USERS


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(f"recbole/dataset_example/ml-100k/{name}", data)
    return path


def test_fetch_with_a_bad_wheel_leaves_no_half_dataset(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    partial = write_dataset(data_dir / "ml-100k")
    (partial / "ml-100k.item").unlink()
    (partial / "ml-100k.user").unlink()
    # The partial directory triggers a fetch; the wheel's files do not match the pinned hashes.
    wheel = make_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl", {n: b"not the data\n" for n in DATASET_FILES})
    with pytest.raises(
        FetchError, match=r"ml-100k.inter in recbole-1.2.1-py3-none-any.whl has sha256 .*, expected 4edb74e2"
    ):
        fetch(data_dir, wheel=wheel)
    # Nothing staged is left behind and the partial copy was not promoted to complete.
    assert sorted(p.name for p in data_dir.iterdir()) == ["ml-100k"]
    assert sorted(p.name for p in partial.iterdir()) == ["ml-100k.inter"]
    with pytest.raises(FetchError, match=r"has no recbole/dataset_example/ml-100k/ml-100k.inter"):
        fetch(data_dir, wheel=make_wheel(tmp_path / "empty.whl", {}))
    assert sorted(p.name for p in data_dir.iterdir()) == ["ml-100k"]


def test_fetch_reports_a_failed_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real pip run against an index on a closed port: no config file, no retries, no cache.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(FetchError, match=r"pip download .* exited with 1; expected it to download recbole==1.2.1"):
        fetch(tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.slow
def test_real_movielens_100k(tmp_path: Path) -> None:
    root = fetch(os.environ.get("FRESHTOWER_DATA_DIR", REPO / "data"))
    for name, digest in DATASET_FILES.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest

    ds = MovieLens100K(root)
    users, items, r = ds.users(), ds.items(), ds.ratings()
    assert (len(users), len(items), len(r)) == (943, 1682, 100_000)
    assert np.all(np.diff(r["ts"]) >= 0)
    assert (int(r["ts"][0]), int(r["ts"][-1])) == (874_724_710, 893_286_638)
    # Ratings 1..5 counted with awk over the file.
    assert np.bincount(r["rating"].astype(np.int64), minlength=6)[1:].tolist() == [6110, 11370, 27145, 34174, 21201]
    assert ds.titles()["i1633"] == "Á köldum klaka (Cold Fever)"
    assert next(i for i in items if i.item_id == "i267").stats == {}  # its year is "unkonwn"

    count, last_ts, clicks = 0, -1, 0
    for e in ds.events(min_rating=4):
        assert decode(encode(e)) == e
        assert e.ts_ms >= last_ts
        last_ts, count, clicks = e.ts_ms, count + 1, clicks + isinstance(e, Click)
    assert clicks == 34174 + 21201
    assert count == 943 + 1682 + 2 * clicks

    # A partial copy is replaced from a wheel holding the real files, without touching the network.
    wheel = make_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl", {n: (root / n).read_bytes() for n in DATASET_FILES})
    partial = tmp_path / "data" / "ml-100k"
    partial.mkdir(parents=True)
    (partial / "ml-100k.inter").write_bytes((root / "ml-100k.inter").read_bytes())
    assert fetch(tmp_path / "data", wheel=wheel) == partial
    assert is_complete(partial)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ml-100k"]
