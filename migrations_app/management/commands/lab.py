import contextlib

from django.conf import settings
from django.core.management.base import CommandError

from criuweb import lab_claims
from migrations_app import lab, ssh
from migrations_app.docker_engine import EngineError

from . import _operations as op


class Command(op.JsonOutcome):
    help = "Bring the lab (lab-1 ... lab-N) up or down, or say what is running."

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["up", "down", "status"])
        parser.add_argument("--demo", action="store_true", help="with up: start the counter workloads on lab-1")
        parser.add_argument("--json", action="store_true", help="with status: machine-readable")
        parser.add_argument(
            "--hosts",
            type=int,
            metavar="N",
            help=f"with up: build lab-1 ... lab-N ({lab.DEFAULT_HOSTS} to {lab.MAX_HOSTS}; hosts beyond N are "
            f"removed). Default: as many as the lab has, {lab.DEFAULT_HOSTS} for a new one",
        )

    def handle(self, action, demo, **options):
        if options["hosts"] is not None and action != "up":
            raise CommandError("--hosts goes with `lab up`: status and down cover every host the lab has")
        try:
            if action == "status":
                self._status(options["json"])
                return
            with self._hand_made():
                if action == "up":
                    if self._is_hand_made():
                        # First: a lab half up is still someone's. Never from
                        # a test session (fleet tests run `lab up`): its id's
                        # marker would stay after the session's own teardown,
                        # and later sessions would skip that id until reboot.
                        lab_claims.mark_hand_made(settings.LAB_ID)
                    lab.up(log=self.stdout.write, demo=demo, count=options["hosts"])
                else:
                    lab.down(log=self.stdout.write)
                    lab_claims.unmark_hand_made(settings.LAB_ID)
        except (lab.LabError, EngineError, ssh.SSHError, lab_claims.LabBusy) as e:
            raise CommandError(str(e))

    @staticmethod
    def _is_hand_made() -> bool:
        # Lab 0 (`make run`) is no test id: no test session would claim it.
        return bool(settings.LAB_HAND_MADE) and settings.LAB_ID != 0

    def _hand_made(self):
        if not self._is_hand_made():
            return contextlib.nullcontext()
        return lab_claims.held(settings.LAB_ID)

    def _status(self, as_json):
        if as_json:
            self.write_json(lab.status())
            return
        for h in lab.status():
            state = "up" if h["sshd"] and h["dockerd"] else "down"
            self.stdout.write(
                f"{h['name']}: {state} (sshd {'up' if h['sshd'] else 'down'}, "
                f"dockerd {'up' if h['dockerd'] else 'down'}) "
                f"ssh -i {h['key']} {h['user']}@{h['address']}"
            )
