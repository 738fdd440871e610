"""Tracker tokens signed in batches: one signature per viewer's tokens, none of them forgeable."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcast import messages as m
from meshcast.crypto import Crypto, SigningKey, SimCrypto, SimKey, token_digest
from meshcast.effects import Send
from tracker.node import TOKEN_LIFETIME, TrackerNode

KEY = SigningKey()
CRYPTO = Crypto()


def unsigned(n: int, channel: str = "ch") -> list[m.Token]:
    return [m.Token(7, 100 + i, channel, i % 4 - 1, 600.0, b"") for i in range(n)]


def test_every_token_of_a_batch_verifies_and_carries_one_signature():
    tokens = CRYPTO.issue_tokens(KEY, unsigned(9))
    assert all(len(t.sig) == m.SIG_LEN + m.TOKEN_SALT + 9 * m.TOKEN_DIGEST for t in tokens)
    assert len({t.sig[:m.SIG_LEN] for t in tokens}) == 1
    assert all(CRYPTO.token_valid(KEY.public, t) for t in tokens)
    assert not any(CRYPTO.token_valid(SigningKey().public, t) for t in tokens)


def test_a_batch_of_one_is_a_plain_token():
    [token] = CRYPTO.issue_tokens(KEY, unsigned(1))
    assert len(token.sig) == m.SIG_LEN
    assert token == CRYPTO.issue_token(KEY, 7, 100, "ch", -1, 600.0)


@pytest.mark.parametrize("n", [0, m.TOKEN_BATCH + 1])
def test_a_batch_too_big_to_send_is_refused(n):
    with pytest.raises(ValueError, match=f"1 to {m.TOKEN_BATCH} tokens, not {n}"):
        CRYPTO.issue_tokens(KEY, unsigned(n))


FIELDS = {"child": 8, "parent": 999, "channel": "other", "substream": 3, "expires": 1e9}


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, m.TOKEN_BATCH), which=st.data(), field=st.sampled_from(sorted(FIELDS)))
def test_no_field_of_a_batched_token_can_be_changed(n, which, field):
    # A viewer holding a batch (its own grants) cannot turn one into a grant for another
    # parent, sub-stream, channel, child or a later expiry: the digest no longer matches.
    tokens = CRYPTO.issue_tokens(KEY, unsigned(n))
    token = tokens[which.draw(st.integers(0, n - 1))]
    assert not CRYPTO.token_valid(KEY.public, replace(token, **{field: FIELDS[field]}))


def parts(token: m.Token) -> tuple[bytes, bytes, bytes]:
    """(signature, salt, batch) of a batched token."""
    at = m.SIG_LEN + m.TOKEN_SALT
    return token.sig[:m.SIG_LEN], token.sig[m.SIG_LEN:at], token.sig[at:]


def test_a_batch_with_a_digest_swapped_in_fails_its_signature():
    # The forger's own grant, listed in place of one of the real ones.
    tokens = CRYPTO.issue_tokens(KEY, unsigned(4))
    sig, salt, batch = parts(tokens[0])
    mine = m.Token(666, 100, "ch", -1, 1e9, b"")
    forged = sig + salt + token_digest(mine, salt) + batch[m.TOKEN_DIGEST:]
    assert not CRYPTO.token_valid(KEY.public, replace(mine, sig=forged))
    # ... or the signature of another batch, on one's own list.
    other = CRYPTO.issue_tokens(KEY, unsigned(4, "other"))[0]
    assert not CRYPTO.token_valid(KEY.public, replace(tokens[0], sig=parts(other)[0] + salt + batch))
    # ... or a batch's signature without its list, or another token's salt.
    assert not CRYPTO.token_valid(KEY.public, replace(tokens[0], sig=sig))
    assert not CRYPTO.token_valid(KEY.public, replace(tokens[0], sig=sig + parts(tokens[1])[1] + batch))


def test_a_digest_counts_only_at_a_digest_boundary():
    tokens = CRYPTO.issue_tokens(KEY, unsigned(3))
    sig, salt, batch = parts(tokens[1])
    shifted = batch[1:] + batch[:1]  # this token's digest now straddles two slots
    assert not CRYPTO.token_valid(KEY.public, replace(tokens[1], sig=sig + salt + shifted))


def test_one_token_does_not_reveal_the_others_in_its_batch():
    # A parent shown one token of a child's batch could otherwise hash guesses of the others
    # (the child's other parents: ids are few, and the expiry is its own token's) and find
    # them in the list. Each digest hashes a salt only its own token carries.
    tokens = CRYPTO.issue_tokens(KEY, unsigned(4))
    shown = tokens[0]
    _, salt, batch = parts(shown)
    listed = {batch[i:i + m.TOKEN_DIGEST] for i in range(0, len(batch), m.TOKEN_DIGEST)}
    for other in unsigned(4)[1:]:
        assert token_digest(other, salt) not in listed  # a guess hashed with the salt shown
        assert token_digest(other, b"") not in listed
    assert token_digest(unsigned(1)[0], salt) in listed  # (the shown token's own is there)
    # The same tokens signed again list other digests.
    again = parts(CRYPTO.issue_tokens(KEY, unsigned(4))[0])[2]
    assert again != batch


# -- the tracker signs a viewer's tokens together --------------------------------------------


def tracker(crypto: SimCrypto | Crypto, key: object, kbps: int = 40_000) -> TrackerNode:
    t = TrackerNode(key=key, crypto=crypto, rng=random.Random(1))
    channel = SigningKey()
    t.link_opened(1, now=0.0)
    t.handle(1, m.Announce("c", channel.public, "seed", kbps, 2000, 4, 200,
                           crypto.sign_announce(channel, "c", "seed")), now=0.0)
    assert t.channels["c"].forest.seed is not None
    t.drain()
    return t


def join(t: TrackerNode, link: int, now: float = 1.0, take: str = "drain") -> list[m.Token]:
    t.link_opened(link, now=now)
    t.handle(link, m.Join("c", f"p{link}", 3000), now=now)
    return tokens_to(t, link, take)


def tokens_to(t: TrackerNode, link: int, take: str = "drain") -> list[m.Token]:
    got = []
    for eff in (t.drain() if take == "drain" else t.swap_effects([])):
        if type(eff) is Send and eff.link == link:
            if type(eff.msg) is m.Assign:
                got += [x for x in (eff.msg.token, eff.msg.backup_token) if x is not None]
            elif type(eff.msg) is m.Neighbours:
                got += eff.msg.tokens
    return got


@pytest.mark.parametrize("take", ["drain", "swap_effects"])
def test_a_join_costs_the_tracker_one_signature_and_every_token_verifies(take):
    key = SigningKey()
    t = tracker(Crypto(), key)
    for link in range(2, 12):
        tokens = join(t, link, take=take)
        # Four parents (one per tree), backups once there are enough viewers, and the seed.
        assert len(tokens) >= 5
        assert len({x.sig[:m.SIG_LEN] for x in tokens}) == 1
        assert all(Crypto().token_valid(key.public, x) for x in tokens)
        assert all(x.child == t.links[link][1].id for x in tokens)


def test_the_simulated_tracker_counts_one_signature_per_join_and_per_renewal():
    crypto = SimCrypto()
    t = tracker(crypto, SimKey(1))
    for link in range(2, 42):
        before = crypto.signed
        tokens = join(t, link)
        assert crypto.signed == before + 1
        assert {len(x.sig) for x in tokens} == {
            m.SIG_LEN + m.TOKEN_SALT + m.TOKEN_DIGEST * len(tokens)}
    # Renewals: every member's fresh tokens (its backups', the seed's) in one signature.
    before = crypto.signed
    t.handle_timer(now=TOKEN_LIFETIME / 2 + 1)
    renewed = t.drain()
    members = {eff.link for eff in renewed if type(eff) is Send}
    assert members and crypto.signed - before == len(members)


def test_a_refused_join_signs_nothing():
    # Leechers (no upload) join until the seed's slots are gone; the one refused got no
    # tokens, and none were signed for it (its placement got as far as some trees).
    crypto = SimCrypto()
    t = tracker(crypto, SimKey(1), kbps=6000)
    for link in range(2, 40):
        t.link_opened(link, now=1.0)
        before = crypto.signed
        t.handle(link, m.Join("c", "", 0), now=1.0)
        sent = [type(e.msg) for e in t.drain() if type(e) is Send]
        if sent == [m.Reject]:
            assert crypto.signed == before
            return
        assert crypto.signed == before + 1
    pytest.fail("no join was refused")
