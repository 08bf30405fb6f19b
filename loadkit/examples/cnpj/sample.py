"""Deterministic sample CNPJ month (the RFB open-data layout) plus the oracle of what a loader must store.

The files mimic the real extraction: one zip per table shard holding one latin-1, ``;``-separated,
fully quoted, header-less member, with the quirks real months carry (NUL bytes, ``S/N``, ``0`` dates,
impossible dates, decimal commas, 7-digit CEPs, orphan motivo ``32``, primary keys repeated across
shards, alphanumeric CNPJ from 2026-07).

Speed: a record is its key plus a few picks from pools of 65536 pre-joined field runs ("segments"),
indexed by random bytes, so a row costs a handful of list look-ups and one join; lines are encoded
and written 100k at a time. Quirks are field overrides at chosen record positions: each one forced
once into shard 0 (so even a 200-row month has them all), some also sprinkled at low rates. The
oracle types the same raw field strings, regenerated from the seed (never read back from the files),
and lazily, so a benchmark month costs nothing until someone asks for its expected rows.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import unicodedata
import zipfile
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Row = dict[str, Any]
SEP = '";"'  # between two fields of a line (every field is quoted)

# --------------------------------------------------------------------------------------------------
# Layout (reference doc section 2.3)
# --------------------------------------------------------------------------------------------------

SHARDED_TABLES = ("empresas", "estabelecimentos", "socios")
SINGLE_TABLES = ("simples", "cnaes", "motivos", "municipios", "naturezas", "paises", "qualificacoes")
TABLES = SHARDED_TABLES + SINGLE_TABLES

_REF_COLUMNS = ("codigo", "descricao")
COLUMNS: dict[str, tuple[str, ...]] = {
    "empresas": (
        "cnpj_basico", "razao_social", "natureza_juridica", "qualificacao_responsavel",
        "capital_social", "porte", "ente_federativo_responsavel",
    ),
    "estabelecimentos": (
        "cnpj_basico", "cnpj_ordem", "cnpj_dv", "identificador_matriz_filial", "nome_fantasia",
        "situacao_cadastral", "data_situacao_cadastral", "motivo_situacao_cadastral",
        "nome_cidade_exterior", "pais", "data_inicio_atividade", "cnae_fiscal_principal",
        "cnae_fiscal_secundaria", "tipo_logradouro", "logradouro", "numero", "complemento",
        "bairro", "cep", "uf", "municipio", "ddd_1", "telefone_1", "ddd_2", "telefone_2",
        "ddd_fax", "fax", "correio_eletronico", "situacao_especial", "data_situacao_especial",
    ),
    "socios": (
        "cnpj_basico", "identificador_de_socio", "nome_socio", "cnpj_cpf_do_socio",
        "qualificacao_do_socio", "data_entrada_sociedade", "pais", "representante_legal",
        "nome_do_representante", "qualificacao_do_representante_legal", "faixa_etaria",
    ),
    "simples": (
        "cnpj_basico", "opcao_pelo_simples", "data_opcao_pelo_simples", "data_exclusao_do_simples",
        "opcao_pelo_mei", "data_opcao_pelo_mei", "data_exclusao_do_mei",
    ),
    **{table: _REF_COLUMNS for table in SINGLE_TABLES[1:]},
}

# Columns typed as something other than text; every other column stays a string.
DATE_COLUMNS = frozenset({
    "data_situacao_cadastral", "data_inicio_atividade", "data_situacao_especial",
    "data_entrada_sociedade", "data_opcao_pelo_simples", "data_exclusao_do_simples",
    "data_opcao_pelo_mei", "data_exclusao_do_mei",
})
DECIMAL_COLUMNS = frozenset({"capital_social"})
INT_COLUMNS = frozenset({"identificador_matriz_filial"})
CEP_COLUMNS = frozenset({"cep"})

_ZIP_STEM = {
    "empresas": "Empresas", "estabelecimentos": "Estabelecimentos", "socios": "Socios",
    "simples": "Simples", "cnaes": "Cnaes", "motivos": "Motivos", "municipios": "Municipios",
    "naturezas": "Naturezas", "paises": "Paises", "qualificacoes": "Qualificacoes",
}
_MEMBER_SUFFIX = {
    "empresas": "EMPRECSV", "estabelecimentos": "ESTABELE", "socios": "SOCIOCSV",
    "cnaes": "CNAECSV", "motivos": "MOTICSV", "municipios": "MUNICCSV", "naturezas": "NATJUCSV",
    "paises": "PAISCSV", "qualificacoes": "QUALSCSV",
}
_EXTRACTION_DAY = 11  # the day the RFB stamps into member names (D40511 = 2024-05-11); exists in every month
_ALNUM_FROM = 202607  # first month whose CNPJ may carry letters
_CHUNK_ROWS = 100_000  # rows joined per write: big writes, bounded memory
_ZIP_LEVEL = 1  # deflate level: the zips only need to be valid and small-ish, the generator fast
_ROOT_MARK = "\x02"  # in a pooled razao_social: replaced by the record's formatted CNPJ root


NAMINGS = ("current", "2021")  # zip names from mid-2022 on (Empresas0.zip) / 2021 to mid-2022 (<member>.zip)


def member_name(table: str, year: int, month: int, shard: int = 0) -> str:
    """Inner file name as the RFB writes it (2025-12: ``K3241.K03200Y0.D51213.EMPRECSV``,
    ``F.K03200$W.SIMPLES.CSV.D51213``, ``F.K03200$Z.D51213.CNAECSV``); the shard number of the sharded
    tables sits in ``Y{shard}``."""
    stamp = f"D{year % 10}{month:02d}{_EXTRACTION_DAY:02d}"
    if table == "simples":
        return f"F.K03200$W.SIMPLES.CSV.{stamp}"
    if table in SHARDED_TABLES:
        return f"K3241.K03200Y{shard}.{stamp}.{_MEMBER_SUFFIX[table]}"
    return f"F.K03200$Z.{stamp}.{_MEMBER_SUFFIX[table]}"


def zip_name(table: str, shard: int | None = None, naming: str = "current", member: str = "") -> str:
    """``Empresas0.zip`` (current) or, with ``naming="2021"``, the member's own name plus ``.zip``."""
    if naming == "2021":
        return f"{member}.zip"
    return f"{_ZIP_STEM[table]}{'' if shard is None else shard}.zip"


# --------------------------------------------------------------------------------------------------
# Reference tables (small fixed lists; motivo 32 deliberately absent: it is an orphan in real data)
# --------------------------------------------------------------------------------------------------

CNAES: tuple[tuple[str, str], ...] = (
    ("0111301", "Cultivo de arroz"),
    ("0151201", "Criação de bovinos para corte"),
    ("1091102", "Fabricação de produtos de padaria e confeitaria com predominância de produção própria"),
    ("4120400", "Construção de edifícios"),
    ("4321500", "Instalação e manutenção elétrica"),
    ("4330404", "Serviços de pintura de edifícios em geral"),
    ("4399103", "Obras de alvenaria"),
    ("4520001", "Serviços de manutenção e reparação mecânica de veículos automotores"),
    ("4711302", "Comércio varejista de mercadorias em geral, com predominância de produtos alimentícios - supermercados"),
    ("4712100", "Comércio varejista de mercadorias em geral, com predominância de produtos alimentícios - minimercados, mercearias e armazéns"),
    ("4723700", "Comércio varejista de bebidas"),
    ("4744099", "Comércio varejista de materiais de construção em geral"),
    ("4753900", "Comércio varejista especializado de eletrodomésticos e equipamentos de áudio e vídeo"),
    ("4772500", "Comércio varejista de cosméticos, produtos de perfumaria e de higiene pessoal"),
    ("4781400", "Comércio varejista de artigos do vestuário e acessórios"),
    ("4789099", "Comércio varejista de outros produtos não especificados anteriormente"),
    ("4930202", "Transporte rodoviário de carga, exceto produtos perigosos e mudanças, intermunicipal, interestadual e internacional"),
    ("5611201", "Restaurantes e similares"),
    ("5620104", "Fornecimento de alimentos preparados preponderantemente para consumo domiciliar"),
    ("6201501", "Desenvolvimento de programas de computador sob encomenda"),
    ("6204000", "Consultoria em tecnologia da informação"),
    ("6920601", "Atividades de contabilidade"),
    ("7020400", "Atividades de consultoria em gestão empresarial, exceto consultoria técnica específica"),
    ("7319002", "Promoção de vendas"),
    ("8112500", "Condomínios prediais"),
    ("8219999", "Preparação de documentos e serviços especializados de apoio administrativo não especificados anteriormente"),
    ("8599604", "Treinamento em desenvolvimento profissional e gerencial"),
    ("8630503", "Atividade médica ambulatorial restrita a consultas"),
    ("8630504", "Atividade odontológica"),
    ("9430800", "Atividades de associações de defesa de direitos sociais"),
    ("9491000", "Atividades de organizações religiosas ou filosóficas"),
    ("9602501", "Cabeleireiros, manicure e pedicure"),
)
MOTIVOS: tuple[tuple[str, str], ...] = (
    ("00", "SEM MOTIVO"),
    ("01", "EXTINÇÃO POR ENCERRAMENTO LIQUIDAÇÃO VOLUNTÁRIA"),
    ("02", "INCORPORAÇÃO"),
    ("03", "FUSÃO"),
    ("08", "TRANSPASSE"),
    ("09", "NÃO INÍCIO DE ATIVIDADE"),
    ("21", "PEDIDO DE BAIXA INDEFERIDA"),
    ("63", "OMISSÃO DE DECLARAÇÕES"),
    ("71", "INAPTIDÃO (LEI 11.941/2009 ART.54)"),
    ("73", "OMISSÃO CONTUMAZ"),
)
# (codigo RFB/SIAFI, descricao, uf); 9707 is the RFB code used for establishments abroad.
MUNICIPIOS: tuple[tuple[str, str, str], ...] = (
    ("7107", "SÃO PAULO", "SP"), ("6001", "RIO DE JANEIRO", "RJ"), ("4123", "BELO HORIZONTE", "MG"),
    ("9701", "BRASÍLIA", "DF"), ("3849", "SALVADOR", "BA"), ("1389", "FORTALEZA", "CE"),
    ("7535", "CURITIBA", "PR"), ("0255", "MANAUS", "AM"), ("2531", "RECIFE", "PE"),
    ("8801", "PORTO ALEGRE", "RS"), ("0427", "BELÉM", "PA"), ("9373", "GOIÂNIA", "GO"),
    ("6477", "GUARULHOS", "SP"), ("6291", "CAMPINAS", "SP"), ("0921", "SÃO LUÍS", "MA"),
    ("2785", "MACEIÓ", "AL"), ("1761", "NATAL", "RN"), ("1219", "TERESINA", "PI"),
    ("2051", "JOÃO PESSOA", "PB"), ("9051", "CAMPO GRANDE", "MS"), ("8105", "FLORIANÓPOLIS", "SC"),
    ("3105", "ARACAJU", "SE"), ("9067", "CUIABÁ", "MT"), ("5705", "VITÓRIA", "ES"),
    ("0971", "CONCEIÇÃO DO ARAGUAIA", "PA"), ("0089", "PORTO VELHO", "RO"), ("0139", "RIO BRANCO", "AC"),
    ("0301", "BOA VISTA", "RR"), ("0605", "MACAPÁ", "AP"), ("9733", "PALMAS", "TO"),
    ("7097", "SÃO JOSÉ DOS CAMPOS", "SP"), ("7071", "SANTO ANDRÉ", "SP"), ("5869", "NITERÓI", "RJ"),
    ("5433", "UBERLÂNDIA", "MG"), ("4733", "CONTAGEM", "MG"), ("7681", "LONDRINA", "PR"),
    ("8319", "CAXIAS DO SUL", "RS"), ("8179", "JOINVILLE", "SC"), ("3657", "FEIRA DE SANTANA", "BA"),
    ("9707", "EXTERIOR", "EX"),
)
NATUREZAS: tuple[tuple[str, str], ...] = (
    ("1015", "Órgão Público do Poder Executivo Federal"),
    ("1023", "Órgão Público do Poder Executivo Estadual ou do Distrito Federal"),
    ("1031", "Órgão Público do Poder Executivo Municipal"),
    ("1104", "Autarquia Federal"),
    ("1244", "Município"),
    ("2046", "Sociedade Anônima Aberta"),
    ("2054", "Sociedade Anônima Fechada"),
    ("2062", "Sociedade Empresária Limitada"),
    ("2135", "Empresário (Individual)"),
    ("2143", "Cooperativa"),
    ("2232", "Sociedade Simples Pura"),
    ("2240", "Sociedade Simples Limitada"),
    ("2305", "Empresa Individual de Responsabilidade Limitada (de Natureza Empresária)"),
    ("2313", "Empresa Individual de Responsabilidade Limitada (de Natureza Simples)"),
    ("2321", "Sociedade Unipessoal de Advocacia"),
    ("3069", "Fundação Privada"),
    ("3220", "Organização Religiosa"),
    ("3999", "Associação Privada"),
    ("4014", "Empresa Individual Imobiliária"),
    ("4120", "Produtor Rural (Pessoa Física)"),
)
PAISES: tuple[tuple[str, str], ...] = (
    ("023", "ALEMANHA"), ("063", "ARGENTINA"), ("097", "BOLÍVIA"), ("105", "BRASIL"),
    ("158", "CHILE"), ("160", "CHINA"), ("245", "ESPANHA"), ("249", "ESTADOS UNIDOS"),
    ("275", "FRANÇA"), ("386", "ITÁLIA"), ("399", "JAPÃO"), ("586", "PARAGUAI"),
    ("607", "PORTUGAL"), ("628", "REINO UNIDO"), ("845", "URUGUAI"),
)
QUALIFICACOES: tuple[tuple[str, str], ...] = (
    ("00", "Não informada"), ("05", "Administrador"), ("08", "Conselheiro de Administração"),
    ("10", "Diretor"), ("16", "Presidente"), ("17", "Procurador"), ("22", "Sócio"),
    ("28", "Sócio-Gerente"), ("31", "Sócio Ostensivo"),
    ("37", "Sócio Pessoa Jurídica Domiciliado no Exterior"),
    ("38", "Sócio Pessoa Física Residente no Exterior"), ("49", "Sócio-Administrador"),
    ("50", "Empresário"), ("54", "Fundador"),
    ("65", "Titular Pessoa Física Residente ou Domiciliado no Brasil"),
)
_REFERENCE_ROWS: dict[str, tuple[tuple[str, str], ...]] = {
    "cnaes": CNAES,
    "motivos": MOTIVOS,
    "municipios": tuple((code, name) for code, name, _ in MUNICIPIOS),
    "naturezas": NATUREZAS,
    "paises": PAISES,
    "qualificacoes": QUALIFICACOES,
}

# Word lists for names and addresses; accents on purpose (all latin-1 representable).
_FIRST = (
    "JOSÉ", "MARIA", "JOÃO", "ANTÔNIO", "FRANCISCO", "ANA", "LUIZ", "PAULO", "CARLOS", "MANOEL",
    "PEDRO", "FRANCISCA", "MARCOS", "RAIMUNDO", "SEBASTIÃO", "ANTÔNIA", "MARCELO", "JORGE", "MÁRCIA",
    "GERALDO", "ADRIANA", "SANDRA", "LUIS", "FERNANDO", "FÁBIO", "ROBERTO", "MÁRCIO", "EDSON",
    "ANDRÉ", "SÉRGIO", "JOSEFA", "PATRÍCIA", "DANIEL", "RODRIGO", "RAFAEL", "JOAQUIM", "VERA",
    "RICARDO", "EDUARDO", "TEREZINHA", "CONCEIÇÃO", "LÚCIA", "CÉLIA", "INÊS", "JULIANA", "BRUNO",
)
_LAST = (
    "SILVA", "SANTOS", "OLIVEIRA", "SOUZA", "RODRIGUES", "FERREIRA", "ALVES", "PEREIRA", "LIMA",
    "GOMES", "COSTA", "RIBEIRO", "MARTINS", "CARVALHO", "ALMEIDA", "LOPES", "SOARES", "FERNANDES",
    "VIEIRA", "BARBOSA", "ROCHA", "DIAS", "NASCIMENTO", "ANDRADE", "MOREIRA", "NUNES", "MARQUES",
    "MACHADO", "MENDES", "FREITAS", "CARDOSO", "RAMOS", "GONÇALVES", "SANTANA", "TEIXEIRA",
    "ARAÚJO", "DA CONCEIÇÃO", "FALCÃO", "BRANDÃO", "GUIMARÃES", "ASSUNÇÃO", "DA SILVA", "DE JESUS",
)
_FOREIGN_NAMES = (
    "JOHN SMITH", "HANS MÜLLER", "JEAN DUPONT", "GIUSEPPE ROSSI", "MARÍA GARCÍA", "LI WEI",
    "HIROSHI TANAKA", "JOSÉ FERNÁNDEZ", "ANNA SCHNEIDER", "PIERRE LEFÈVRE", "MANUEL GONZÁLEZ",
)
_BIZ_KIND = (
    "COMÉRCIO DE ROUPAS", "SERVIÇOS", "INDÚSTRIA", "DISTRIBUIDORA", "CONSTRUÇÕES", "TRANSPORTES",
    "ALIMENTOS", "CONFECÇÕES", "TECNOLOGIA", "CONSULTORIA", "INFORMÁTICA", "MATERIAIS DE CONSTRUÇÃO",
    "AUTO PEÇAS", "FARMÁCIA", "PADARIA", "RESTAURANTE", "ACADEMIA", "LOGÍSTICA", "EDUCAÇÃO",
    "SAÚDE", "AGROPECUÁRIA", "IMOBILIÁRIA", "ENGENHARIA", "PARTICIPAÇÕES", "EMPREENDIMENTOS",
    "CALÇADOS", "MÓVEIS", "ÓTICA", "SALÃO DE BELEZA", "LANCHONETE", "AÇOUGUE", "MERCEARIA",
)
_BIZ_NAME = (
    "ALVORADA", "BOA VISTA", "SÃO JORGE", "SANTA LUZIA", "NOVA ERA", "PRIMAVERA", "BELA VISTA",
    "ESTRELA", "PLANALTO", "AURORA", "IPÊ", "JEQUITIBÁ", "PARANÁ", "MARANHÃO", "AÇAÍ", "PIRACICABA",
    "TUPÃ", "ITAÚNA", "UNIÃO", "PROGRESSO", "CONCEIÇÃO", "CAJU", "SÃO JOÃO", "CORAÇÃO DE JESUS",
    "PAZ E BEM", "FÊNIX", "ÁGUIA", "IGUAÇU", "PARAÍSO", "JARDIM", "CENTRAL", "DO POVO", "BRASIL",
)
_BIZ_SUFFIX = ("LTDA", "LTDA", "LTDA", "LTDA ME", "LTDA EPP", "EIRELI", "S.A.", "ME")
_STREET = (
    "DAS FLORES", "SÃO JOÃO", "BARÃO DE MAUÁ", "DA CONCEIÇÃO", "PRESIDENTE VARGAS", "SETE DE SETEMBRO",
    "DOM PEDRO II", "TIRADENTES", "JOSÉ BONIFÁCIO", "DA ABOLIÇÃO", "MARECHAL DEODORO",
    "DA INDEPENDÊNCIA", "PAULISTA", "BRIGADEIRO FARIA LIMA", "DOS ANDRADAS", "DA PAZ",
    "XV DE NOVEMBRO", "RUI BARBOSA", "GETÚLIO VARGAS", "SANTOS DUMONT", "DUQUE DE CAXIAS",
    "CASTRO ALVES", "MACHADO DE ASSIS", "DA CONSOLAÇÃO", "DOS BANDEIRANTES", "CONSELHEIRO LAFAIETE",
    "PADRE ANCHIETA", "SÃO SEBASTIÃO", "DO COMÉRCIO", "DA ESTAÇÃO", "CORONEL JOÃO PESSOA",
)
_BAIRRO = (
    ("CENTRO", 20), ("", 2), ("JARDIM SÃO PAULO", 3), ("CONCEIÇÃO", 3), ("VILA MARIANA", 3),
    ("BOA VIAGEM", 3), ("SANTA CECÍLIA", 3), ("JARDIM AMÉRICA", 3), ("SÃO CRISTÓVÃO", 3),
    ("CONSOLAÇÃO", 3), ("BELA VISTA", 3), ("PARQUE SÃO JORGE", 2), ("VILA NOVA CONCEIÇÃO", 2),
    ("JARDIM EUROPA", 2), ("CIDADE NOVA", 3), ("ZONA RURAL", 4), ("LIBERDADE", 3), ("IPANEMA", 2),
    ("SAVASSI", 2), ("ÁGUA VERDE", 2), ("BAIRRO DOS ESTADOS", 2), ("PARQUE INDUSTRIAL", 3),
    ("JARDIM DAS ACÁCIAS", 2), ("VILA SÃO JOSÉ", 3), ("NOSSA SENHORA APARECIDA", 2),
)
_DDD = ("11", "11", "11", "21", "21", "31", "61", "71", "85", "41", "51", "81", "92", "27", "48",
        "62", "19", "13", "34", "98")
_MAIL_DOMAINS = ("gmail.com", "hotmail.com", "yahoo.com.br", "outlook.com", "uol.com.br",
                 "bol.com.br", "terra.com.br", "empresa.com.br")

# Impossible yet digit-only dates the oracle must turn into None.
_IMPOSSIBLE_DATES = ("20230230", "20210931", "20190229", "20221301", "20200000")
# Date-field noise in real months: (value, share of records).
_DATE_NOISE = (("0", 0.003), ("00000000", 0.002), ("", 0.002),
               *((d, 0.0002) for d in _IMPOSSIBLE_DATES))
_DUP_TAG = "(NOVA DENOMINAÇÃO)"  # only re-emitted keys carry it, so their content differs for sure

# --------------------------------------------------------------------------------------------------
# Pools: tuples of exactly 256 or 65536 entries, indexed by random bytes / uint16
# --------------------------------------------------------------------------------------------------

_SMALL, _LARGE = 256, 65536
_DISTINCT = 8192  # distinct values per large pool


def _idx8(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def _idx16(rng: random.Random, n: int) -> array:
    idx = array("H")
    idx.frombytes(rng.randbytes(2 * n))
    if sys.byteorder == "big":  # same picks on every machine
        idx.byteswap()
    return idx


def _take(pool: Sequence[T], idx: bytes | array) -> list[T]:
    return list(map(pool.__getitem__, idx))


def _pick(rng: random.Random, pool: Sequence[T], n: int) -> list[T]:
    """n uniform picks from a 256- or 65536-entry pool (weights are baked into repetitions)."""
    return _take(pool, _idx8(rng, n) if len(pool) == _SMALL else _idx16(rng, n))


def _weighted(items: Sequence[tuple[T, float]], size: int = _SMALL) -> tuple[T, ...]:
    """Pool where each value appears in proportion to its weight (at least once)."""
    total = sum(w for _, w in items)
    counts = [max(1, round(w * size / total)) for _, w in items]
    counts[counts.index(max(counts))] += size - sum(counts)
    return tuple(value for (value, _), count in zip(items, counts) for _ in range(count))


def _varied(prng: random.Random, make: Callable[[random.Random], T], size: int = _LARGE) -> list[T]:
    """size entries from _DISTINCT made values tiled: picks stay uniform, building stays cheap."""
    return [make(prng) for _ in range(_DISTINCT)] * (size // _DISTINCT)


def _sprinkle(prng: random.Random, pool: list[T], noise: Sequence[tuple[T, float]]) -> tuple[T, ...]:
    """Overwrite random pool slots with noise values at the given shares (at least one slot each)."""
    counts = [max(1, round(share * len(pool))) for _, share in noise]
    slots = prng.sample(range(len(pool)), sum(counts))
    values = [value for (value, _), count in zip(noise, counts) for _ in range(count)]
    for slot, value in zip(slots, values):
        pool[slot] = value
    return tuple(pool)


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def _person(r: random.Random) -> str:
    return f"{r.choice(_FIRST)} {r.choice(_LAST)} {r.choice(_LAST)}"


def _company(r: random.Random) -> str:
    return f"{r.choice(_BIZ_KIND)} {r.choice(_BIZ_NAME)} {r.choice(_BIZ_SUFFIX)}"


def _fantasia(r: random.Random) -> str:
    if r.random() < 0.3:
        return f"{r.choice(_BIZ_KIND)} DO {r.choice(_FIRST)}"
    return f"{r.choice(_BIZ_KIND)} {r.choice(_BIZ_NAME)}"


def _masked_cpf(r: random.Random) -> str:
    return f"***{r.randrange(1_000_000):06d}**"


def _date_str(r: random.Random, lo: date, hi: date) -> str:
    return date.fromordinal(r.randint(lo.toordinal(), hi.toordinal())).strftime("%Y%m%d")


def _date_pool(prng: random.Random, lo: date, hi: date, noise: Sequence[tuple[str, float]]) -> tuple[str, ...]:
    return _sprinkle(prng, _varied(prng, lambda r: _date_str(r, lo, hi)), noise)


def _draw(prng: random.Random, pool: Sequence[T]) -> list[T]:
    """One large-pool-sized column of picks, to assemble composite segments."""
    return _pick(prng, pool, _LARGE)


def _compose(*columns: Sequence[str]) -> tuple[str, ...]:
    """Segments of several adjacent fields pre-joined: a row then costs a few picks, not 30."""
    return tuple(map(SEP.join, zip(*columns)))


Pools = dict[str, dict[str, tuple[str, ...]]]  # table -> segment name -> 65536 pre-joined segments


@lru_cache(maxsize=4)
def _pools(seed: int, year: int, month: int) -> Pools:
    """All segment pools; dates stay before the extraction month so 'valid' means valid and past."""
    prng = random.Random(f"{seed}:pools")
    lo, hi = date(1965, 1, 1), date(year, month, 1) - timedelta(days=1)
    return {
        "estabelecimentos": _estab_pools(prng, lo, hi),
        "empresas": _empresa_pools(prng),
        "socios": _socio_pools(prng, lo, hi),
        "simples": _simples_pools(prng, max(lo, date(2007, 7, 1)), hi),
    }


def _estab_pools(prng: random.Random, lo: date, hi: date) -> dict[str, tuple[str, ...]]:
    """Segments: nome_fantasia | situacao_cadastral..cnae_fiscal_secundaria | tipo_logradouro..cep |
    uf..data_situacao_especial (the key segment is computed per record)."""
    situacao = _weighted([
        (("02", "00"), 55), (("08", "01"), 18), (("08", "00"), 4), (("08", "02"), 1), (("08", "03"), 0.5),
        (("08", "09"), 1), (("04", "63"), 7), (("04", "71"), 2), (("04", "73"), 2), (("03", "00"), 2),
        (("03", "08"), 0.5), (("01", "21"), 1),
    ])
    cnae_codes = [code for code, _ in CNAES]

    def secundaria(r: random.Random) -> str:
        return "" if r.random() < 0.5 else ",".join(r.sample(cnae_codes, r.randint(1, 5)))

    def street(r: random.Random) -> str:
        name = r.choice(_STREET) if r.random() < 0.6 else f"{r.choice(_FIRST)} {r.choice(_LAST)}"
        return name if r.random() < 0.006 else _ascii(name)

    def numero(r: random.Random) -> str:
        x = r.random()
        if x < 0.095:
            return "S/N" if x < 0.052 else "SN" if x < 0.089 else "S N"
        if x < 0.10:
            return f"{r.randint(1, 999)}{r.choice('ABCH')}"
        return "" if x < 0.105 else str(r.randint(1, 4000))

    def complemento(r: random.Random) -> str:
        if r.random() < 0.55:
            return ""
        kind = r.choice(("SALA", "APTO", "LOJA", "BLOCO", "ANDAR", "CASA", "GALPÃO", "CONJ", "QUADRA"))
        return f"{kind} {r.randint(1, 1500)}" if r.random() < 0.9 else r.choice(("TÉRREO", "SOBRELOJA", "FUNDOS"))

    def phones(r: random.Random) -> str:
        def one(share: float, placeholder: str, placeholder_share: float) -> str:
            x = r.random()
            if x < placeholder_share:
                return placeholder
            if x >= share:
                return SEP
            ddd = r.choice(_DDD) if r.random() > 0.013 else f"0{r.choice(_DDD)}"  # 3-digit area codes occur
            return f"{ddd}{SEP}{r.randrange(10 ** 6, 10 ** 8)}"
        # real 2025-12 shares: ddd_1/telefone_1 filled 85% ('0'/'0' 4%); ddd_2/telefone_2 '0000'/'00000000'
        # 1.6%; fax '0'/'0' 3.5%
        return SEP.join((one(0.85, f"0{SEP}0", 0.04), one(0.08, f"0000{SEP}00000000", 0.016),
                         one(0.08, f"0{SEP}0", 0.035)))  # ddd_1..fax

    def email(r: random.Random) -> str:
        if r.random() < 0.3:
            return ""
        name = _ascii(f"{r.choice(_FIRST)}.{r.choice(_LAST)}").lower().replace(" ", "")
        address = f"{name}{r.randint(1, 999)}@{r.choice(_MAIL_DOMAINS)}"
        return address.upper() if r.random() < 0.77 else address

    municipios = _weighted([(f"{uf}{SEP}{code}", 40 if code in ("7107", "6001") else 8 if int(code) % 3 == 0 else 4)
                            for code, _, uf in MUNICIPIOS if uf != "EX"])
    sit = _idx8(prng, _LARGE)
    return {
        "nome_fantasia": tuple(_varied(prng, lambda r: "" if r.random() < 0.63 else _ascii(_fantasia(r)))),
        "status": _compose(
            [s for s, _ in _take(situacao, sit)],
            _draw(prng, _date_pool(prng, lo, hi, _DATE_NOISE)),
            [m for _, m in _take(situacao, sit)],
            [""] * _LARGE,  # nome_cidade_exterior: only the foreign-establishment quirk fills it
            _draw(prng, _weighted([("", 255), ("105", 1)])),
            _draw(prng, _date_pool(prng, lo, hi, [(d, 0.0002) for d in _IMPOSSIBLE_DATES[:2]])),
            _draw(prng, _weighted([(code, 1) for code in cnae_codes])),
            _draw(prng, _varied(prng, secundaria)),
        ),
        "address": _compose(
            _draw(prng, _weighted([("RUA", 65), ("AVENIDA", 17.7), ("ESTRADA", 2.2), ("RODOVIA", 2), ("QUADRA", 1.7),
                                   ("10A RUA", 1.6), ("TRAVESSA", 1.4), ("", 1.2), ("SITIO", 1), ("PRACA", 0.75),
                                   ("ALAMEDA", 0.55), ("FAZENDA", 0.4), ("1A RUA", 0.2), ("SÍTIO", 0.25),
                                   ("BECO", 0.25), ("RUA PRINCIPAL", 0.15)])),
            _draw(prng, _varied(prng, street)),
            _draw(prng, _varied(prng, numero)),
            _draw(prng, _varied(prng, complemento)),
            _draw(prng, _weighted(_BAIRRO)),
            _draw(prng, _sprinkle(prng, _varied(prng, lambda r: f"{r.randrange(1_000_000, 100_000_000):08d}"),
                                  [("", 0.0035), ("0", 0.0005), ("       0", 0.0002)])),
        ),
        "contact": _compose(
            _draw(prng, municipios),
            _draw(prng, _varied(prng, phones)),
            _draw(prng, _varied(prng, email)),
            _draw(prng, _weighted([(SEP, 254), (f"RECUPERACAO JUDICIAL{SEP}20191105", 1),
                                   (f"EM LIQUIDAÇÃO EXTRAJUDICIAL{SEP}20200302", 1)])),
        ),
    }


def _empresa_pools(prng: random.Random) -> dict[str, tuple[str, ...]]:
    """Segment: razao_social..ente_federativo_responsavel (everything but the key)."""
    def profile(r: random.Random) -> tuple[str, str, str, str, str]:
        """(razao_social, natureza, qualificacao_responsavel, porte, ente_federativo)."""
        x = r.random()
        porte = "00" if r.random() < 0.02 else None
        if x < 0.69:  # MEI / empresário individual (real 2025-12: 69% of empresas)
            name, y = _ascii(_person(r)), r.random()
            if y < 0.63:  # "12.345.678 NAME": the formatted CNPJ root, filled in per record (_ROOT_MARK)
                return f"{_ROOT_MARK}{name}", "2135", "50", porte or "01", ""
            if y < 0.86:  # older registrations end with the CPF
                return f"{name} {r.randrange(10 ** 10, 10 ** 11)}", "2135", "50", porte or "01", ""
            return name, "2135", "50", porte or "01", ""
        if x < 0.88:
            return _ascii(_company(r)), "2062", "49", porte or r.choice(("01", "01", "01", "03", "05")), ""
        if x < 0.90:
            return _ascii(f"{r.choice(_BIZ_KIND)} {r.choice(_BIZ_NAME)} EIRELI"), "2305", "65", porte or "01", ""
        if x < 0.92:
            return _ascii(f"{r.choice(_LAST)} E {r.choice(_LAST)} ADVOGADOS"), "2240", "49", porte or "05", ""
        if x < 0.93:
            return _ascii(f"{r.choice(_BIZ_NAME)} {r.choice(_BIZ_KIND)} S.A."), "2054", "10", porte or "05", ""
        if x < 0.96:
            return _ascii(f"ASSOCIACAO DE MORADORES DO BAIRRO {r.choice(_BIZ_NAME)}"), "3999", "16", porte or "05", ""
        if x < 0.97:
            return _ascii(f"IGREJA EVANGELICA {r.choice(_BIZ_NAME)}"), "3220", "16", porte or "05", ""
        if x < 0.98:
            return _ascii(f"COOPERATIVA {r.choice(_BIZ_KIND)} {r.choice(_BIZ_NAME)}"), "2143", "16", porte or "05", ""
        _, city, uf = r.choice(MUNICIPIOS[:-1])
        if x < 0.99:  # public bodies: the only ones with ente_federativo_responsavel
            return _ascii(f"MUNICIPIO DE {city}"), "1244", "05", "05", f"{city} - {uf}"
        return _ascii(f"SECRETARIA MUNICIPAL DE SAUDE DE {city}"), "1031", "05", "05", f"{city} - {uf}"

    def capital(r: random.Random) -> str:
        x = r.random()
        cents = r.randrange(100)
        if x < 0.20:
            return "0,00"
        if x < 0.60:
            return f"{r.choice((1000, 2000, 5000, 10000, 20000, 30000, 50000, 100000))},00"
        # no thousands dots: 0 of 2,012 real rows have one (only the forced quirks below carry them)
        return f"{r.randint(100, 5_000_000)},{cents:02d}" if x < 0.97 else f"{r.randint(5_000_000, 90_000_000)},00"

    razao, natureza, qualificacao, porte, ente = zip(*_varied(prng, profile))
    return {"tail": _compose(razao, natureza, qualificacao, _draw(prng, _varied(prng, capital)), porte, ente)}


def _socio_pools(prng: random.Random, lo: date, hi: date) -> dict[str, tuple[str, ...]]:
    """Segment: identificador_de_socio..faixa_etaria (everything but the key)."""
    foreign = [code for code, _ in PAISES if code != "105"]

    def profile(r: random.Random) -> tuple[str, str, str, str, str, str]:
        """(identificador, nome, cpf_cnpj, qualificacao, pais, faixa_etaria)."""
        x = r.random()
        if x < 0.90:
            qual = r.choice(("49", "49", "49", "22", "22", "05", "16", "65", "10", "28"))
            return "2", _person(r), _masked_cpf(r), qual, "", r.choice("2333444455556667789")
        if x < 0.98:
            doc = f"{r.randrange(10 ** 7, 10 ** 8):08d}0001{r.randrange(100):02d}"
            return "1", _company(r), doc, "22", "", "0"
        doc = "" if r.random() < 0.5 else "***999999**"
        return "3", r.choice(_FOREIGN_NAMES), doc, r.choice(("37", "38")), r.choice(foreign), r.choice("0567")

    def representante(r: random.Random) -> str:
        if r.random() < 0.97:
            return f"***000000**{SEP}{SEP}00"  # the placeholder 97% of real rows carry
        return SEP.join((_masked_cpf(r), _person(r), r.choice(("05", "17"))))

    ident, nome, doc, qual, pais, faixa = zip(*_varied(prng, profile))
    entrada = _date_pool(prng, lo, hi, _DATE_NOISE)
    return {"tail": _compose(ident, nome, doc, qual, entrada, pais, _draw(prng, _varied(prng, representante)), faixa)}


def _simples_pools(prng: random.Random, lo: date, hi: date) -> dict[str, tuple[str, ...]]:
    """Segment: opcao_pelo_simples..data_exclusao_do_mei (everything but the key)."""
    none = "00000000"  # the RFB writes 'not applicable' dates as zeros in this file
    mei_lo = max(lo, date(2009, 7, 1))

    def span(r: random.Random, start: date) -> tuple[str, str]:
        begin = date.fromordinal(r.randint(start.toordinal(), hi.toordinal()))
        end = date.fromordinal(r.randint(begin.toordinal(), hi.toordinal()))
        return begin.strftime("%Y%m%d"), end.strftime("%Y%m%d")

    def profile(r: random.Random) -> str:
        (start, end), (mei_start, mei_end) = span(r, lo), span(r, mei_lo)
        x = r.random()
        if x < 0.40:
            fields = ("S", start, none, "N", none, none)
        elif x < 0.65:
            fields = ("S", start, none, "S", mei_start, none)
        elif x < 0.85:
            fields = ("N", start, end, "N", none, none)
        else:
            fields = ("N", start, end, "N", mei_start, mei_end)
        return SEP.join(fields)

    return {"tail": tuple(_varied(prng, profile))}


# --------------------------------------------------------------------------------------------------
# The plan: sizes, keys, cross-shard duplicates
# --------------------------------------------------------------------------------------------------

def _rng(seed: int, *parts: object) -> random.Random:
    """Independent stream per (table, shard, purpose): the oracle can regenerate one table alone."""
    return random.Random(":".join(map(str, (seed, *parts))))


def _split(total: int, parts: int) -> tuple[int, ...]:
    return tuple(total // parts + (1 if i < total % parts else 0) for i in range(parts))


def _coprime_near(n: int, ratio: float = 0.6180339887) -> int:
    """Multiplier m with gcd(m, n) == 1: u -> u*m % n is then a cheap shuffle of range(n)."""
    m = max(1, int(n * ratio))
    while math.gcd(m, n) != 1:
        m += 1
    return m


def _b36(value: int, width: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = []
    for _ in range(width):
        value, rem = divmod(value, 36)
        out.append(digits[rem])
    return "".join(reversed(out))


@dataclass(frozen=True)
class _Keyed:
    """A sharded table whose records are entities in shuffled order plus re-emitted (duplicate) keys."""
    sizes: tuple[int, ...]              # records per shard, duplicates included
    unique: int                         # distinct entities
    mult: int                           # shuffle multiplier
    ustart: tuple[int, ...]             # unique records written before each shard
    dups: tuple[dict[int, int], ...]    # per shard: position -> entity re-emitted there

    def entities(self, shard: int, a: int, b: int) -> list[int]:
        """Entity of each record at positions [a, b) of a shard."""
        dups, n, m = self.dups[shard], self.unique, self.mult
        inside = sorted(pos for pos in dups if a <= pos < b)
        u = self.ustart[shard] + a - sum(1 for pos in dups if pos < a)
        out = [v * m % n for v in range(u, u + (b - a) - len(inside))]
        for pos in inside:  # ascending, so earlier inserts keep later positions right
            out.insert(pos - a, dups[pos])
        return out


def _keyed(rng: random.Random, total: int, shards: int, n_dups: int) -> _Keyed:
    """Re-emit n_dups keys in later shards (or at the end of a single shard): the later record wins."""
    sizes = _split(total, shards)
    unique = total - n_dups
    mult = _coprime_near(unique)
    per_shard = [0] * shards
    for i in range(n_dups):
        per_shard[0 if shards == 1 else 1 + i % (shards - 1)] += 1
    ustart: list[int] = []
    dups: list[dict[int, int]] = []
    used: set[int] = set()
    written = 0
    for shard, size in enumerate(sizes):
        k = per_shard[shard]
        ustart.append(written)
        if shards == 1:
            positions, earlier = list(range(size - k, size)), size - k
        else:
            positions, earlier = sorted(rng.sample(range(size), k)), written
        mapping: dict[int, int] = {}
        for pos in positions:
            original = rng.randrange(earlier)
            while original in used:
                original = rng.randrange(earlier)
            used.add(original)
            mapping[pos] = original * mult % unique
        dups.append(mapping)
        written += size - k
    return _Keyed(sizes, unique, mult, tuple(ustart), tuple(dups))


_DV = [f"{i:02d}" for i in range(100)]  # cnpj_dv: numeric even for alphanumeric CNPJ
_MATRIZ_TAILS = [f"{SEP}0001{SEP}{dv}{SEP}1" for dv in _DV]  # cnpj_ordem..identificador of a matriz, by dv
_SPREAD = 61_803_401  # coprime with 10**8 and 36**7: e -> e*_SPREAD is injective and scattered


@dataclass(frozen=True)
class _Plan:
    year: int
    month: int
    seed: int
    shards: int
    alnum: bool
    empresas: _Keyed
    estabelecimentos: _Keyed
    socios: tuple[int, ...]
    simples: int
    basicos: list[str] = field(repr=False)

    def estab_keys(self, entities: list[int]) -> list[str]:
        """Key segments 'cnpj_basico";"cnpj_ordem";"cnpj_dv";"identificador' of establishments.

        The first n_emp establishments are the matrizes of empresa j; the rest are filiais."""
        n_emp, basicos, tails = self.empresas.unique, self.basicos, _MATRIZ_TAILS
        return [basicos[j] + tails[(j * 37 + 11) % 100] if j < n_emp else self._filial_key(j) for j in entities]

    def _filial_key(self, j: int) -> str:
        n_emp = self.empresas.unique
        f = j - n_emp
        e, num = f % n_emp, 2 + f // n_emp
        ordem = f"{chr(65 + e % 26)}{num:03d}" if self.alnum and f % 8 == 0 else f"{num:04d}"
        return f"{self.basicos[e]}{SEP}{ordem}{SEP}{_DV[(j * 37 + 11) % 100]}{SEP}2"

    def sizes(self, table: str) -> tuple[int, ...]:
        if table in ("empresas", "estabelecimentos"):
            return getattr(self, table).sizes
        if table == "socios":
            return self.socios
        if table == "simples":
            return (self.simples,)
        return (len(_REFERENCE_ROWS[table]),)


def _basicos(n: int, seed: int, alnum: bool) -> list[str]:
    """Distinct 8-char cnpj_basico per empresa; from 2026-07 every 40th one carries letters."""
    offset = _rng(seed, "basico").randrange(10 ** 8)
    out = [f"{(e * _SPREAD + offset) % 10 ** 8:08d}" for e in range(n)]
    if alnum:  # a leading letter keeps them apart from the numeric ones
        for e in range(7, n, 40):
            out[e] = chr(65 + e % 26) + _b36((e * _SPREAD + offset) % 36 ** 7, 7)
    return out


def _plan(year: int, month: int, rows: int, shards: int, seed: int) -> _Plan:
    if not 1980 <= year <= 2099 or not 1 <= month <= 12:
        raise ValueError(f"bad month {year}-{month}")
    if shards < 1 or rows < 50 * shards:
        raise ValueError(f"need shards >= 1 and rows >= 50 per shard, got rows={rows} shards={shards}")
    rng = _rng(seed, "plan")
    n_emp = round(rows * 0.8)
    empresas = _keyed(rng, n_emp, shards, max(2, n_emp // 10_000))
    estabelecimentos = _keyed(rng, rows, shards, max(3, rows // 10_000))
    alnum = year * 100 + month >= _ALNUM_FROM
    return _Plan(
        year=year, month=month, seed=seed, shards=shards, alnum=alnum,
        empresas=empresas, estabelecimentos=estabelecimentos,
        socios=_split(round(rows * 0.5), shards), simples=round(rows * 0.6),
        basicos=_basicos(empresas.unique, seed, alnum),
    )


# --------------------------------------------------------------------------------------------------
# Quirks: forced ones land in shard 0 (so tiny months have them all), sparse ones at low rates
# --------------------------------------------------------------------------------------------------

Override = dict[str, str]
_FORCED: dict[str, tuple[Override, ...]] = {
    "estabelecimentos": (
        {"complemento": "SALA\x00 101"},
        {"complemento": "\x00"},
        {"tipo_logradouro": "RUA", "logradouro": "DA CONCEIÇÃO\x00"},
        {"numero": "S/N"},
        {"nome_fantasia": "PADARIA AÇÃO DE SÃO PAULO", "tipo_logradouro": "AVENIDA",
         "logradouro": "SÃO JOÃO", "bairro": "CONCEIÇÃO"},
        {"nome_fantasia": "", "complemento": "", "correio_eletronico": "", "ddd_2": "", "telefone_2": ""},
        {"data_situacao_cadastral": "0"},
        {"data_situacao_cadastral": "00000000"},
        {"data_situacao_cadastral": ""},
        {"data_situacao_cadastral": "20230230"},
        {"data_inicio_atividade": "20210931"},
        {"cep": "1310100", "uf": "SP", "municipio": "7107"},
        {"pais": "105"},
        {"pais": "023", "nome_cidade_exterior": "BERLIM", "uf": "EX", "municipio": "9707", "cep": ""},
        {"situacao_cadastral": "08", "motivo_situacao_cadastral": "01"},
        {"situacao_cadastral": "08", "motivo_situacao_cadastral": "32"},
        {"municipio": "0971", "uf": "PA"},
        {"cnae_fiscal_secundaria": "4781400,5611201,9602501"},
        {"cnae_fiscal_secundaria": ""},
        {"situacao_especial": "RECUPERACAO JUDICIAL", "data_situacao_especial": "20191105"},
        {"cep": "0", "ddd_1": "0", "telefone_1": "0"},
        {"cep": "       0", "ddd_2": "0000", "telefone_2": "00000000", "ddd_fax": "0", "fax": "0"},
        {"tipo_logradouro": "10A RUA", "numero": "SN"},
        {"numero": "S N", "ddd_1": "061"},
    ),
    "empresas": (
        {"capital_social": "1.234,56"},
        {"capital_social": "10000,00"},
        {"capital_social": "0,00"},
        {"capital_social": "999999999999,00"},
        {"capital_social": "1.500.000,00"},
        {"razao_social": "CONFECÇÕES SÃO JOÃO LTDA", "natureza_juridica": "2062",
         "qualificacao_responsavel": "49", "porte": "03", "ente_federativo_responsavel": ""},
        {"razao_social": "MUNICÍPIO DE CONCEIÇÃO DO ARAGUAIA", "natureza_juridica": "1244",
         "qualificacao_responsavel": "05", "porte": "05",
         "ente_federativo_responsavel": "CONCEIÇÃO DO ARAGUAIA - PA"},
    ),
    "socios": (
        {"data_entrada_sociedade": "0"},
        {"data_entrada_sociedade": "00000000"},
        {"data_entrada_sociedade": ""},
        {"data_entrada_sociedade": "20230230"},
        {"identificador_de_socio": "3", "nome_socio": "HANS MÜLLER", "cnpj_cpf_do_socio": "",
         "qualificacao_do_socio": "37", "pais": "023", "faixa_etaria": "0"},
        {"identificador_de_socio": "2", "nome_socio": "JOÃO DA CONCEIÇÃO", "pais": "", "faixa_etaria": "5"},
    ),
    "simples": (  # the real file writes every missing date as 00000000 (never 0 or empty)
        {"data_exclusao_do_simples": "00000000"},
        {"data_opcao_pelo_mei": "00000000", "data_exclusao_do_mei": "00000000"},
        {"data_opcao_pelo_simples": "20230230"},
    ),
}
# (share of records, variants cycled over the chosen positions)
_SPARSE: dict[str, tuple[tuple[float, tuple[Override, ...]], ...]] = {
    "estabelecimentos": (
        (0.0005, ({"complemento": "SALA\x00 101"}, {"complemento": "\x00"}, {"complemento": "LOJA 2\x00\x00"})),
        (0.0002, ({"logradouro": "DAS FLORES\x00"}, {"nome_fantasia": "BAR DO ZÉ\x00"})),
        (0.001, ({"cep": "1310100"}, {"cep": "4545000"}, {"cep": "9010000"})),
        (0.003, ({"situacao_cadastral": "08", "motivo_situacao_cadastral": "32"},)),
        (0.002, ({"pais": "607", "nome_cidade_exterior": "LISBOA", "uf": "EX", "municipio": "9707", "cep": ""},
                 {"pais": "249", "nome_cidade_exterior": "MIAMI", "uf": "EX", "municipio": "9707", "cep": ""},
                 {"pais": "063", "nome_cidade_exterior": "BUENOS AIRES", "uf": "EX", "municipio": "9707", "cep": ""})),
    ),
    "empresas": ((0.0005, ({"capital_social": "999999999999,00"},)),),
    "socios": (),
    "simples": (
        (0.002, ({"data_exclusao_do_mei": "00000000"}, {"data_opcao_pelo_mei": "20190229"})),
    ),
}

Overrides = dict[int, list[tuple[int, str]]]  # record position -> [(column index, raw value)]


def _overrides(plan: _Plan, table: str, shard: int, size: int) -> Overrides:
    """Quirk positions for one shard; applied in order sparse, forced, duplicate (last wins)."""
    rng = _rng(plan.seed, table, shard, "quirks")
    index = {name: i for i, name in enumerate(COLUMNS[table])}
    out: Overrides = {}

    def put(pos: int, values: Override) -> None:
        out.setdefault(pos, []).extend((index[col], value) for col, value in values.items())

    for share, variants in _SPARSE.get(table, ()):
        for i, pos in enumerate(rng.sample(range(size), round(size * share))):
            put(pos, variants[i % len(variants)])
    if shard == 0:
        forced = _FORCED.get(table, ())
        for q, values in enumerate(forced):
            put(q * size // len(forced), values)
    keyed: _Keyed | None = getattr(plan, table) if table in ("empresas", "estabelecimentos") else None
    if keyed is not None:  # re-emitted keys get a name the original cannot have
        col = "nome_fantasia" if table == "estabelecimentos" else "razao_social"
        for pos in keyed.dups[shard]:
            put(pos, {col: f"{_company(rng)} {_DUP_TAG}"})
    return out


# --------------------------------------------------------------------------------------------------
# Line generators: (plan, pools, rng, shard, a, b) -> lines (fields joined by SEP, outer quotes
# left off) for records [a, b) of the shard: a key segment plus a few pre-joined pool segments
# --------------------------------------------------------------------------------------------------

Generator = Callable[[_Plan, Pools, random.Random, int, int, int], list[str]]


def _gen_estabelecimentos(plan: _Plan, pools: Pools, rng: random.Random, shard: int, a: int, b: int) -> list[str]:
    P, n = pools["estabelecimentos"], b - a
    keys = plan.estab_keys(plan.estabelecimentos.entities(shard, a, b))
    return list(map(SEP.join, zip(keys, _pick(rng, P["nome_fantasia"], n), _pick(rng, P["status"], n),
                                  _pick(rng, P["address"], n), _pick(rng, P["contact"], n))))


def _gen_empresas(plan: _Plan, pools: Pools, rng: random.Random, shard: int, a: int, b: int) -> list[str]:
    basicos = plan.basicos
    keys = [basicos[e] for e in plan.empresas.entities(shard, a, b)]
    lines = list(map(SEP.join, zip(keys, _pick(rng, pools["empresas"]["tail"], b - a))))
    for i, line in enumerate(lines):  # MEI names that start with the formatted root: "12.345.678 NAME"
        if line[8 + len(SEP)] == _ROOT_MARK:
            k = line[:8]
            lines[i] = line.replace(_ROOT_MARK, f"{k[:2]}.{k[2:5]}.{k[5:]} ", 1)
    return lines


def _gen_socios(plan: _Plan, pools: Pools, rng: random.Random, shard: int, a: int, b: int) -> list[str]:
    n = b - a
    basicos, n_emp = plan.basicos, len(plan.basicos)
    owners = array("I")
    owners.frombytes(rng.randbytes(4 * n))
    if sys.byteorder == "big":
        owners.byteswap()
    keys = [basicos[x % n_emp] for x in owners]
    return list(map(SEP.join, zip(keys, _pick(rng, pools["socios"]["tail"], n))))


def _gen_simples(plan: _Plan, pools: Pools, rng: random.Random, shard: int, a: int, b: int) -> list[str]:
    # distinct empresas (cnpj_basico is this table's PK): k -> k*m mod n_emp is injective
    n_emp, basicos = len(plan.basicos), plan.basicos
    m = _coprime_near(n_emp, 0.41421356)
    keys = [basicos[k * m % n_emp] for k in range(a, b)]
    return list(map(SEP.join, zip(keys, _pick(rng, pools["simples"]["tail"], b - a))))


def _gen_reference(table: str) -> Generator:
    def gen(plan: _Plan, pools: Pools, rng: random.Random, shard: int, a: int, b: int) -> list[str]:
        return [SEP.join(row) for row in _REFERENCE_ROWS[table][a:b]]
    return gen


_GENERATORS: dict[str, Generator] = {
    "empresas": _gen_empresas,
    "estabelecimentos": _gen_estabelecimentos,
    "socios": _gen_socios,
    "simples": _gen_simples,
    **{table: _gen_reference(table) for table in _REFERENCE_ROWS},
}


def _shard_chunks(plan: _Plan, table: str, shard: int) -> Iterator[list[str]]:
    """Lines of one shard, chunk by chunk, quirks applied. Same plan -> same strings."""
    size = plan.sizes(table)[shard]
    pools = _pools(plan.seed, plan.year, plan.month)
    rng = _rng(plan.seed, table, shard, "lines")
    overrides = _overrides(plan, table, shard, size) if table in _FORCED else {}
    for a in range(0, size, _CHUNK_ROWS):
        b = min(size, a + _CHUNK_ROWS)
        lines = _GENERATORS[table](plan, pools, rng, shard, a, b)
        for pos, changes in overrides.items():
            if a <= pos < b:
                fields = lines[pos - a].split(SEP)
                for col, value in changes:
                    fields[col] = value
                lines[pos - a] = SEP.join(fields)
        yield lines


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def _encode(lines: list[str]) -> bytes:
    """Fully quoted latin-1 lines, '\\n'-terminated (values never hold '"', ';' or newlines)."""
    return ('"' + '"\n"'.join(lines) + '"\n').encode("latin-1") if lines else b""


def _write(folder: Path, archive: str, member: str, chunks: Iterator[bytes], stamp: tuple[int, int, int, int, int, int],
           compress: bool, rows: int) -> Path:
    """Write one member, zipped with fixed metadata (byte-identical reruns) or raw for benchmarks."""
    if not compress:
        path = folder / member
        with open(path, "wb", buffering=1 << 20) as fh:
            for chunk in chunks:
                fh.write(chunk)
        return path
    path = folder / archive
    info = zipfile.ZipInfo(member, date_time=stamp)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3
    info.external_attr = 0o644 << 16
    # renamed from _compresslevel in Python 3.13
    setattr(info, "compress_level" if hasattr(info, "compress_level") else "_compresslevel", _ZIP_LEVEL)
    with zipfile.ZipFile(path, "w") as zf, zf.open(info, "w", force_zip64=rows * 1000 > zipfile.ZIP64_LIMIT) as fh:
        for chunk in chunks:
            fh.write(chunk)
    return path


# --------------------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------------------

def _text(raw: str) -> str | None:
    # loadkit strips NUL bytes after null detection (issue 11 item 16): a lone NUL is an empty string.
    if not raw:
        return None
    return raw.replace("\x00", "")


def _as_date(raw: str) -> date | None:
    s = _text(raw)
    if s is None or s in ("0", "00000000") or len(s) != 8 or not s.isdigit():
        return None
    try:
        return date(int(s[:4]), int(s[4:6]), int(s[6:]))
    except ValueError:  # 20230230 and friends
        return None


def _as_decimal(raw: str) -> Decimal | None:
    s = _text(raw)
    return None if s is None else Decimal(s.replace(".", "").replace(",", "."))


def _as_int(raw: str) -> int | None:
    s = _text(raw)
    return None if s is None else int(s)


CEP_PLACEHOLDERS = ("0", "       0", "00000000")  # "no CEP" in real rows: NULL, never padded to 00000000
DDD_PLACEHOLDERS = ("0", "00", "000", "0000")
PHONE_PLACEHOLDERS = ("0", "0000", "00000000")
DDD_COLUMNS = frozenset({"ddd_1", "ddd_2", "ddd_fax"})
PHONE_COLUMNS = frozenset({"telefone_1", "telefone_2", "fax"})


def _as_cep(raw: str) -> str | None:
    s = _text(raw)
    if s in CEP_PLACEHOLDERS:
        return None
    return s.zfill(8) if s is not None and len(s) == 7 and s.isdigit() else s


def _as_ddd(raw: str) -> str | None:
    s = _text(raw)
    return None if s in DDD_PLACEHOLDERS else s


def _as_phone(raw: str) -> str | None:
    s = _text(raw)
    return None if s in PHONE_PLACEHOLDERS else s


def _converter(column: str) -> Callable[[str], Any]:
    if column in DATE_COLUMNS:
        return _as_date
    if column in DECIMAL_COLUMNS:
        return _as_decimal
    if column in INT_COLUMNS:
        return _as_int
    if column in CEP_COLUMNS:
        return _as_cep
    if column in DDD_COLUMNS:
        return _as_ddd
    if column in PHONE_COLUMNS:
        return _as_phone
    return _text


def _typed_rows(table: str, chunks: Iterable[list[str]]) -> list[Row]:
    """Typed rows (what the loader must store) from raw lines, one dict per record."""
    names = COLUMNS[table]
    converters = [_converter(name) for name in names]
    rows = []
    for lines in chunks:
        for line in lines:
            fields = line.split(SEP)
            if len(fields) != len(names):  # a generator bug, never expected data
                raise RuntimeError(f"{table}: {len(fields)} fields in {line!r}")
            rows.append({name: convert(value) for name, convert, value in zip(names, converters, fields)})
    return rows


class _LazyExpected(Mapping[str, list[Row]]):
    """table -> expected rows, regenerated from the seed on first access and then cached."""

    def __init__(self, year: int, month: int, rows: int, shards: int, seed: int) -> None:
        self._args = (year, month, rows, shards, seed)
        self._plan: _Plan | None = None  # built on first access only: benchmarks never pay for it
        self._cache: dict[str, list[Row]] = {}

    def __getitem__(self, table: str) -> list[Row]:
        if table not in TABLES:
            raise KeyError(table)
        if table not in self._cache:
            plan = self._plan = self._plan or _plan(*self._args)
            chunks = (c for shard in range(len(plan.sizes(table))) for c in _shard_chunks(plan, table, shard))
            self._cache[table] = _typed_rows(table, chunks)
        return self._cache[table]

    def __iter__(self) -> Iterator[str]:
        return iter(TABLES)

    def __len__(self) -> int:
        return len(TABLES)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

@dataclass
class SampleManifest:
    year: int
    month: int
    root: Path                                  # folder holding the YYYY-MM folder
    files: dict[str, list[str]]                 # table -> file paths relative to root, shard order
    rows: dict[str, int]                        # table -> records written (cross-shard duplicates included)
    expected: Mapping[str, list[Row]] = field(repr=False)  # table -> typed rows in file order (lazy)

    @property
    def folder(self) -> Path:
        return self.root / f"{self.year:04d}-{self.month:02d}"

    def to_json(self, path: Path | str) -> None:
        """Counts and files only: the expected rows are derivable from the generator arguments."""
        doc = {"year": self.year, "month": self.month, "files": self.files, "rows": self.rows}
        Path(path).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def generate_month(root: Path, year: int, month: int, *, rows: int = 2000, shards: int = 2,
                   seed: int = 0, compress: bool = True, naming: str = "current") -> SampleManifest:
    """Write a sample month under root/YYYY-MM; same arguments -> byte-identical files.

    ``naming``: "current" writes ``Empresas0.zip`` ... ``Qualificacoes.zip`` (RFB releases from mid-2022
    on); "2021" names each zip after its member (``K3241.K03200Y0.D10612.EMPRECSV.zip``), as 2021 to
    mid-2022 releases did. The rows are the same either way."""
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    root = Path(root)
    plan = _plan(year, month, rows, shards, seed)
    folder = root / f"{year:04d}-{month:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = (year, month, _EXTRACTION_DAY, 0, 0, 0)
    files: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for table in TABLES:
        sizes = plan.sizes(table)
        files[table] = []
        for shard, size in enumerate(sizes):
            member = member_name(table, year, month, shard)
            archive = zip_name(table, shard if table in SHARDED_TABLES else None, naming, member)
            chunks = map(_encode, _shard_chunks(plan, table, shard))
            path = _write(folder, archive, member, chunks, stamp, compress, size)
            files[table].append(path.relative_to(root).as_posix())
        counts[table] = sum(sizes)
    return SampleManifest(year, month, root, files, counts, _LazyExpected(year, month, rows, shards, seed))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadkit.examples.cnpj.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--year", type=int, required=True)
    parser.add_argument("--month", type=int, required=True)
    parser.add_argument("--out", type=Path, default=Path("data"), help="root folder; the month goes in OUT/YYYY-MM")
    parser.add_argument("--rows", type=int, default=2000, help="estabelecimentos records across shards")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compress", dest="compress", action="store_false",
                        help="write raw member files instead of zips (benchmarks)")
    parser.add_argument("--naming", choices=NAMINGS, default="current",
                        help="zip names: current (Empresas0.zip) or 2021 (<member>.zip)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    manifest = generate_month(args.out, args.year, args.month, rows=args.rows, shards=args.shards,
                              seed=args.seed, compress=args.compress, naming=args.naming)
    manifest.to_json(manifest.folder / "manifest.json")
    n_files = sum(len(paths) for paths in manifest.files.values())
    size_mb = sum((manifest.root / p).stat().st_size for paths in manifest.files.values() for p in paths) / 1e6
    per_table = " ".join(f"{table}={count}" for table, count in manifest.rows.items())
    sys.stdout.write(f"{manifest.folder}: {n_files} files, {size_mb:.2f} MB, "
                     f"{time.perf_counter() - started:.1f}s; rows {per_table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
