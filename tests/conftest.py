import pytest

from migrations_app import lab
from migrations_app.models import Host


@pytest.fixture(scope="session")
def lab_up(django_db_setup, django_db_blocker):
    """The test lab: two real hosts with sshd, Docker and CRIU, for the whole session.

    Built by the tests and removed by them; `make run`'s lab is another one.
    """
    with django_db_blocker.unblock():
        lab.up(log=lambda *a: None)
        try:
            yield
        finally:
            lab.down(log=lambda *a: None)


@pytest.fixture
def hosts(lab_up, db):
    return Host.objects.get(name="lab-1"), Host.objects.get(name="lab-2")
