"""The published gptDialog request contract (telechat_ascend.telechat_api) against the rules of Tele-AI's
service/telechat_service.py, written out here: defaults, strict types, open/closed ranges, role order, codes."""

import pytest

from telechat_ascend.telechat_api import DialogRequestError, error_body, parse_dialog_request

QUESTION = [{"role": "user", "content": "你好"}]
DIALOG = [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}, {"role": "user", "content": "c"}]


def test_defaults_are_the_published_services():
    request = parse_dialog_request({"dialog": QUESTION})
    assert (request.question, request.history) == ("你好", [])
    assert request.settings == {"do_sample": True, "max_length": 4096, "top_k": 20, "top_p": 0.2,
                                "temperature": 0.1, "repetition_penalty": 1.03}
    request = parse_dialog_request({"dialog": DIALOG, "top_k": 5, "temperature": 0.7, "do_sample": False,
                                    "max_length": None})
    assert request.question == "c" and request.history == DIALOG[:2]
    assert (request.settings["top_k"], request.settings["temperature"], request.settings["do_sample"],
            request.settings["max_length"]) == (5, 0.7, False, 4096)  # null means the default, as item.get does


@pytest.mark.parametrize("body, code", [
    ({}, 10301),
    ({"messages": QUESTION}, 10301),
    ([1, 2], 10301),
    ({"dialog": [{"role": "bot", "content": "x"}]}, 10904),
    ({"dialog": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 10904),
    ({"dialog": DIALOG[:2]}, 10904),  # ends with the bot: no question
    ({"dialog": []}, 10904),
    ({"dialog": "hello"}, 10904),
    ({"dialog": [{"role": "user", "content": 3}]}, 10904),
    ({"dialog": QUESTION, "max_length": 0}, 10305),
    ({"dialog": QUESTION, "max_length": 4097}, 10305),
    ({"dialog": QUESTION, "max_length": 100.0}, 10305),  # an integer field
    ({"dialog": QUESTION, "max_length": True}, 10305),
    ({"dialog": QUESTION, "top_k": 100}, 10305),  # open at 100
    ({"dialog": QUESTION, "top_k": 0}, 10305),
    ({"dialog": QUESTION, "top_p": 1}, 10305),  # a float field: 1 is an int
    ({"dialog": QUESTION, "top_p": 1.0}, 10305),
    ({"dialog": QUESTION, "temperature": 0.0}, 10305),
    ({"dialog": QUESTION, "temperature": float("nan")}, 10305),
    ({"dialog": QUESTION, "repetition_penalty": 1.0}, 10305),  # open at 1
    ({"dialog": QUESTION, "repetition_penalty": 100.0}, 10305),
    ({"dialog": QUESTION, "do_sample": "yes"}, 10305),
])
def test_bad_requests_get_the_published_codes(body, code):
    with pytest.raises(DialogRequestError) as error:
        parse_dialog_request(body)
    assert error.value.code == code
    assert error.value.body() == {"seqid": "", "code": str(code), "message": error_body(code)["message"],
                                  "flag": "0", "data": "执行失败"}


@pytest.mark.parametrize("field, value", [("max_length", 4096), ("max_length", 1), ("top_k", 99), ("top_k", 1),
                                          ("top_p", 0.999), ("temperature", 0.999), ("repetition_penalty", 99.9),
                                          ("repetition_penalty", 1.001)])
def test_values_at_the_edges_of_the_ranges_pass(field, value):
    assert parse_dialog_request({"dialog": QUESTION, field: value}).settings[field] == value


def test_messages_are_the_services():
    assert error_body(10301)["message"] == "服务必填参数缺失"
    assert error_body(10904)["message"] == "服务请求参数dialog错误"
    assert error_body(10305)["message"] == "请求参数范围错误"
    assert error_body(10903)["message"] == "服务执行失败"
