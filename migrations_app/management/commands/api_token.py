"""Issue, list and revoke users' API tokens from the command line."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

from ...models import ApiToken


class Command(BaseCommand):
    help = "Issue (create), list or revoke API tokens. A new token's secret is printed once; only its hash is kept."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="issue a token for a user and print its secret")
        create.add_argument("--user", required=True)
        create.add_argument("--name", required=True, help="what it is for")
        listing = sub.add_parser("list", help="tokens (never their secrets)")
        listing.add_argument("--user")
        revoke = sub.add_parser("revoke", help="delete a token: it stops working at once")
        revoke.add_argument("token", help="its id (from list) or the secret's first characters")

    def handle(self, *args, action, **options):
        getattr(self, f"_{action}")(**options)

    def _create(self, user, name, **_):
        try:
            owner = User.objects.get(username=user)
        except User.DoesNotExist:
            raise CommandError(f"no user {user!r}") from None
        if not owner.is_active:
            raise CommandError(f"user {user!r} is inactive: a token of theirs would be refused")
        if len(name) > ApiToken._meta.get_field("name").max_length:
            raise CommandError("a token's name has at most 100 characters")
        token, secret = ApiToken.issue(owner, name)
        self.stderr.write(f"token {token.pk} for {owner.username}; its secret (shown only now):")
        self.stdout.write(secret)

    def _list(self, user=None, **_):
        tokens = ApiToken.objects.select_related("user")
        if user:
            tokens = tokens.filter(user__username=user)
        for t in tokens:
            used = t.last_used.isoformat(timespec="seconds") if t.last_used else "never used"
            self.stdout.write(f"{t.pk}\t{t.user.username}\t{t.prefix}…\t{t.name}\t{used}")

    def _revoke(self, token, **_):
        if token.isdigit():
            found = list(ApiToken.objects.filter(pk=int(token)))
        elif len(token) >= 10:
            # A whole secret names its token by its hash; its first characters by the stored prefix.
            found = list(ApiToken.objects.filter(digest=ApiToken.hash(token))) or list(
                ApiToken.objects.filter(prefix=token[:10])
            )
        else:
            raise CommandError("give the token's id, or at least its first 10 characters")
        if len(found) != 1:
            raise CommandError(f"{len(found)} tokens match {token!r}: give its id (see `api_token list`)")
        pk = found[0].pk
        found[0].delete()
        self.stdout.write(f"token {pk} revoked")
