import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create an administrator when there is none, and say how to log in."

    def handle(self, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            return
        password = os.environ.get("CRIUWEB_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser("admin", "", password)
        self.stdout.write(
            "Created the administrator. Log in at http://127.0.0.1:8000/ as\n"
            f"  user: admin\n  password: {password}\n"
            "(shown this once; `python manage.py changepassword admin` sets another)"
        )
