"""The study's views for the async server (gunicorn + one uvicorn worker).

The database work uses Django's async ORM (acreate, async for, acount), which runs it on
threads through sync_to_async. The CPU view has no await: it blocks the event loop, as in the
study.
"""
from django.http import HttpResponseNotAllowed, JsonResponse

from .models import Post


async def cpu(request):
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    ct = 0
    for i in range(10**7):
        ct += i * i
    return JsonResponse({"ct": ct})


async def io_create(request):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    post = await Post.objects.acreate(
        title=request.POST.get("title", ""), content=request.POST.get("content", "")
    )
    return JsonResponse(post.as_dict())


async def io_read(request):
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    posts = [p.as_dict() async for p in Post.objects.all()[:25]]
    return JsonResponse({"ct": await Post.objects.acount(), "posts": posts})
