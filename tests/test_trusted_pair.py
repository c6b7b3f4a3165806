"""The trusted migration network setting of a host pair."""

import pytest
from django.core.exceptions import ValidationError

from migrations_app.models import Host, TrustedPair


@pytest.fixture
def two_hosts(db):
    return [Host.objects.create(name=n, address=a, key_path="k") for n, a in (("a", "10.0.0.1"), ("b", "10.0.0.2"))]


def test_a_pair_is_one_row_whichever_way_given(two_hosts):
    a, b = two_hosts
    assert not TrustedPair.between(a, b)
    TrustedPair.trust(b, a)
    TrustedPair.trust(a, b)
    assert TrustedPair.objects.count() == 1
    assert TrustedPair.between(a, b) and TrustedPair.between(b, a)


def test_admin_style_validation_orders_and_refuses_one_host(two_hosts):
    a, b = two_hosts
    pair = TrustedPair(host_a=b, host_b=a)
    pair.full_clean()  # given in the "wrong" order, accepted and ordered
    pair.save()
    assert (pair.host_a_id, pair.host_b_id) == (a.pk, b.pk)
    with pytest.raises(ValidationError, match="two different hosts"):
        TrustedPair(host_a=a, host_b=a).full_clean()


def test_removing_a_host_removes_its_pairs(two_hosts):
    a, b = two_hosts
    TrustedPair.trust(a, b)
    b.delete()
    assert not TrustedPair.objects.exists()
