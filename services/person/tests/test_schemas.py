"""Request validation of the person service: CPF normalisation, people and money (pydantic)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import pytest
from person.schemas import DebtIn, ItemIn, PersonIn, PersonPatch, normalise_cpf
from pydantic import ValidationError

pytestmark = pytest.mark.unit

SEED = {
    "cpf": 11111,
    "name": "abc",
    "address": "abc",
    "date_of_birth": "2019-06-15T19:23:55-03:00",
}


def reasons(exc: pytest.ExceptionInfo[ValidationError]) -> dict[str, list[str]]:
    """The validation errors of a failed model_validate, by field."""
    found: dict[str, list[str]] = {}
    for err in exc.value.errors():
        found.setdefault(".".join(str(p) for p in err["loc"]), []).append(err["type"])
    return found


# -- normalise_cpf -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "digits"),
    [
        (11111, "11111"),
        ("11111", "11111"),
        (0, "0"),
        ("111.111.111-11", "11111111111"),
        ("111 111 111 11", "11111111111"),
        (" 111.111.111-11 ", "11111111111"),
        ("\t123.456.789-09\n", "12345678909"),
        ("1" * 14, "1" * 14),
        (10**13, "1" + "0" * 13),
    ],
)
def test_a_cpf_is_normalised_to_its_digits(raw, digits):
    assert normalise_cpf(raw) == digits


@pytest.mark.parametrize(
    "raw",
    [
        True,
        False,
        1.0,
        11111.5,
        Decimal("11111"),
        None,
        [11111],
        "abc",
        "111a11",
        "111/111",
        "",
        "   ",
        ".-.",
        "1" * 15,
        10**14,
        "١٢٣",  # Arabic-Indic digits are not ASCII digits
    ],
)
def test_a_cpf_that_is_not_digits_is_refused(raw):
    with pytest.raises(ValueError):
        normalise_cpf(raw)


def test_a_negative_number_is_not_taken_for_a_cpf():
    # BUG: str(-22222) is "-22222"; the dash is stripped as CPF punctuation, so a JSON number
    # -22222 silently becomes CPF "22222".
    with pytest.raises(ValueError):
        normalise_cpf(-22222)


# -- PersonIn ----------------------------------------------------------------------------------
def test_the_seed_payload_is_a_valid_person():
    person = PersonIn.model_validate(SEED)
    assert person.cpf == "11111"
    assert person.name == "abc"
    assert person.address == "abc"
    assert person.email is None


@pytest.mark.parametrize(
    "moment",
    [
        "2019-06-15T19:23:55-03:00",
        "2019-06-15T23:30:00-03:00",  # already the 16th in UTC
        "2019-06-15T01:00:00+09:00",  # still the 14th in UTC
        "2019-06-15T12:00:00Z",
        "2019-06-15T12:00:00",
    ],
)
def test_a_date_time_of_birth_keeps_its_own_calendar_date(moment):
    person = PersonIn.model_validate({**SEED, "date_of_birth": moment})
    assert person.date_of_birth == date(2019, 6, 15)


def test_a_plain_date_of_birth_is_accepted():
    assert PersonIn.model_validate({**SEED, "date_of_birth": "2019-06-15"}).date_of_birth == date(
        2019, 6, 15
    )


@pytest.mark.parametrize(
    "moment",
    [
        (datetime.now(UTC).date() + timedelta(days=2)).isoformat(),
        # noon of that day: the parameters must be the same in every pytest-xdist worker
        datetime.combine(datetime.now(UTC).date() + timedelta(days=2), time(12), UTC).isoformat(),
        "9999-12-31",
    ],
)
def test_a_date_of_birth_in_the_future_is_refused(moment):
    with pytest.raises(ValidationError) as exc:
        PersonIn.model_validate({**SEED, "date_of_birth": moment})
    assert "date_of_birth" in reasons(exc)


@pytest.mark.parametrize(
    "moment",
    ["15/06/2019", "2019-02-30", "not a date", "", "2019-06-15T", "2019-06-15T99:00", "1899-12-31"],
)
def test_an_unparseable_or_implausible_date_of_birth_is_refused(moment):
    with pytest.raises(ValidationError) as exc:
        PersonIn.model_validate({**SEED, "date_of_birth": moment})
    assert "date_of_birth" in reasons(exc)


def test_an_unknown_field_is_refused():
    with pytest.raises(ValidationError) as exc:
        PersonIn.model_validate({**SEED, "nickname": "x"})
    assert reasons(exc) == {"nickname": ["extra_forbidden"]}


@pytest.mark.parametrize("field", ["cpf", "name", "address", "date_of_birth"])
def test_every_field_but_email_is_required(field):
    body = {k: v for k, v in SEED.items() if k != field}
    with pytest.raises(ValidationError) as exc:
        PersonIn.model_validate(body)
    assert reasons(exc) == {field: ["missing"]}


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", ""), ("name", "   "), ("name", 5), ("address", ""), ("address", ["a"])],
)
def test_a_name_or_address_must_be_non_blank_text(field, value):
    with pytest.raises(ValidationError) as exc:
        PersonIn.model_validate({**SEED, field: value})
    assert field in reasons(exc)


def test_names_and_addresses_are_trimmed():
    person = PersonIn.model_validate({**SEED, "name": "  Ana  ", "address": " Rua A "})
    assert (person.name, person.address) == ("Ana", "Rua A")


def test_an_email_is_optional_and_may_be_null():
    assert PersonIn.model_validate(SEED).email is None
    assert PersonIn.model_validate({**SEED, "email": None}).email is None


def test_a_valid_email_is_kept():
    assert PersonIn.model_validate({**SEED, "email": "ana@example.com"}).email == "ana@example.com"


@pytest.mark.parametrize(
    "email", ["not-an-email", "a@b", "@example.com", "ana@", "", 42, "a" * 250 + "@example.com"]
)
def test_an_invalid_email_is_refused(email):
    with pytest.raises(ValidationError) as exc:
        PersonIn.model_validate({**SEED, "email": email})
    assert "email" in reasons(exc)


def test_a_patch_may_remove_the_email_but_not_blank_other_fields():
    assert PersonPatch.model_validate({"email": None}).model_dump(exclude_unset=True) == {
        "email": None
    }
    with pytest.raises(ValidationError) as exc:
        PersonPatch.model_validate({"name": None, "address": None, "date_of_birth": None})
    assert set(reasons(exc)) == {"name", "address", "date_of_birth"}


def test_a_patch_keeps_only_the_fields_sent():
    patch = PersonPatch.model_validate({"name": "Ana"})
    assert patch.model_dump(exclude_unset=True) == {"name": "Ana"}


# -- money -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1000, Decimal("1000")),
        (0, Decimal("0")),
        (Decimal("10.50"), Decimal("10.50")),
        ("1000.25", Decimal("1000.25")),
        ("100000", Decimal("100000")),
        (Decimal("1E+2"), Decimal("100")),
        ("999999999999999.99", Decimal("999999999999999.99")),
    ],
)
@pytest.mark.parametrize("model", [ItemIn, DebtIn])
def test_money_accepts_integers_decimals_and_numeric_strings(model, value, expected):
    assert model.model_validate({"type": "renting", "value": value}).value == expected


@pytest.mark.parametrize(
    "value",
    [
        -1,
        Decimal("-0.01"),
        "-5",
        True,
        False,
        "abc",
        "",
        None,
        [1000],
        {"amount": 1},
        "NaN",
        Decimal("NaN"),
        Decimal("sNaN"),
        "Infinity",
        Decimal("-Infinity"),
        1.5,  # a float never comes out of the JSON parser; one that does is refused
        "1.001",
        Decimal("0.001"),
        "1000000000000000",  # 16 whole digits do not fit NUMERIC(17, 2)
        10**30,
        "1e400",
    ],
)
@pytest.mark.parametrize("model", [ItemIn, DebtIn])
def test_money_that_is_negative_not_numeric_or_not_exact_is_refused(model, value):
    with pytest.raises(ValidationError) as exc:
        model.model_validate({"type": "renting", "value": value})
    assert list(reasons(exc)) == ["value"]


def test_money_is_required():
    with pytest.raises(ValidationError) as exc:
        ItemIn.model_validate({"type": "renting"})
    assert reasons(exc) == {"value": ["missing"]}


def test_the_seed_income_asset_and_debt_are_valid():
    assert ItemIn.model_validate({"type": "renting", "value": 1000}).type == "renting"
    assert ItemIn.model_validate({"type": "apartment", "value": 100000}).value == 100000
    assert DebtIn.model_validate({"value": 1000}).value == 1000


def test_a_debt_type_is_optional_but_an_income_or_asset_type_is_not():
    assert DebtIn.model_validate({"value": 1}).type is None
    assert DebtIn.model_validate({"value": 1, "type": None}).type is None
    assert DebtIn.model_validate({"value": 1, "type": "loan"}).type == "loan"
    with pytest.raises(ValidationError) as exc:
        ItemIn.model_validate({"value": 1})
    assert reasons(exc) == {"type": ["missing"]}


@pytest.mark.parametrize("type_", ["", "   ", 5, "x" * 51])
@pytest.mark.parametrize("model", [ItemIn, DebtIn])
def test_an_item_type_must_be_short_non_blank_text(model, type_):
    with pytest.raises(ValidationError) as exc:
        model.model_validate({"type": type_, "value": 1})
    assert list(reasons(exc)) == ["type"]


@pytest.mark.parametrize("model", [ItemIn, DebtIn])
def test_an_item_refuses_unknown_fields(model):
    with pytest.raises(ValidationError) as exc:
        model.model_validate({"type": "x", "value": 1, "currency": "BRL"})
    assert reasons(exc) == {"currency": ["extra_forbidden"]}
