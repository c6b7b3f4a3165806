import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from criuweb.private_files import write_private_file


class Command(BaseCommand):
    help = "Create an administrator when there is none, and say where its password is."

    def handle(self, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            return
        chosen = os.environ.get("CRIUWEB_ADMIN_PASSWORD")
        password = chosen or secrets.token_urlsafe(16)
        user = User(username="admin", is_staff=True, is_superuser=True)
        try:
            validate_password(password, user)
        except ValidationError as e:
            raise CommandError("CRIUWEB_ADMIN_PASSWORD is refused: " + " ".join(e.messages)) from None
        user.set_password(password)
        user.save()
        if chosen:
            where = "the password set in CRIUWEB_ADMIN_PASSWORD"
        else:
            # Never on the terminal: its output ends up in logs and scrollback.
            path = settings.ADMIN_PASSWORD_FILE
            write_private_file(path, password + "\n")
            where = f"the password in {path} (readable by this user only; delete it once you have logged in)"
        self.stdout.write(
            f"Created the administrator. Log in at http://{os.environ.get('BIND', '127.0.0.1:8000')}/ as admin with\n"
            f"  {where}.\n"
            "`python manage.py changepassword admin` sets another password."
        )
