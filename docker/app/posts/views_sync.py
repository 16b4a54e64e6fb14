"""The study's views for the sync server (gunicorn sync worker).

CSRF is off: CsrfViewMiddleware is not installed (csrf_exempt does not wrap async views in
Django 4.1), so io_create takes a plain form POST.
"""
from django.http import HttpResponseNotAllowed, JsonResponse

from .models import Post


def cpu(request):
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    # Pure-Python CPU work, no database (about 0.7-0.9 s).
    ct = 0
    for i in range(10**7):
        ct += i * i
    return JsonResponse({"ct": ct})


def io_create(request):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    post = Post.objects.create(title=request.POST.get("title", ""), content=request.POST.get("content", ""))
    return JsonResponse(post.as_dict())


def io_read(request):
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    posts = [p.as_dict() for p in Post.objects.all()[:25]]
    return JsonResponse({"ct": Post.objects.count(), "posts": posts})
