"""Call Classify the way grpcurl and ghz do: through server reflection, with no generated stubs."""
from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.conftest import photo_bytes


def test_reflection_lists_services_and_classify_works(stack) -> None:
    with grpc.insecure_channel(stack.gateway_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"shopvision.v1.ProductRecognition", "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("shopvision.v1.ProductRecognition")
        method = service.methods_by_name["Classify"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary("/shopvision.v1.ProductRecognition/Classify",
                                   request_serializer=request_class.SerializeToString,
                                   response_deserializer=response_class.FromString)
        reply = call(request_class(image=photo_bytes("coffee.png"), top_k=2), timeout=30)
        assert len(reply.predictions) == 2
        assert reply.predictions[0].label == "espresso"
